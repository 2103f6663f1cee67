
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


#ifndef _NGX_MAIL_SMTP_EXT_CACHE_H_INCLUDED_
#define _NGX_MAIL_SMTP_EXT_CACHE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_mail.h>


#define NGX_MAIL_SMTP_EXT_CACHE_KEY_MAX    1024
#define NGX_MAIL_SMTP_EXT_CACHE_VALUE_MAX  255   /* a route target */


char *ngx_mail_smtp_ext_cache_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_uint_t ngx_mail_smtp_ext_cache_enabled(ngx_mail_session_t *s);
ngx_int_t ngx_mail_smtp_ext_cache_get(ngx_mail_session_t *s, ngx_str_t *key,
    u_char *buf, ngx_str_t *value, ngx_uint_t stale_ok);
void ngx_mail_smtp_ext_cache_put(ngx_mail_session_t *s, ngx_str_t *key,
    ngx_str_t *value);
void ngx_mail_smtp_ext_cache_init_module(
    ngx_mail_smtp_ext_main_conf_t *smcf);


#endif /* _NGX_MAIL_SMTP_EXT_CACHE_H_INCLUDED_ */
