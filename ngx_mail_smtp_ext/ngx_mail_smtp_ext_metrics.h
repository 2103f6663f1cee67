
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


#ifndef _NGX_MAIL_SMTP_EXT_METRICS_H_INCLUDED_
#define _NGX_MAIL_SMTP_EXT_METRICS_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_mail.h>


/*
 * SPEC 9: counters in one shared memory zone, summed over the workers,
 * kept across reloads.  Every call below is a few atomic additions: no
 * lock on the session's path.
 */

#define NGX_SMTP_EXT_M_ZONE         "smtp_ext_metrics"

/* smtp_ext_connections_rejected_total{reason} */
#define NGX_SMTP_EXT_M_LIMIT_CONN   0
#define NGX_SMTP_EXT_M_RATELIMIT    1
#define NGX_SMTP_EXT_M_PREGREET     2
#define NGX_SMTP_EXT_M_DNSBL        3

/* smtp_ext_redis_requests_total{result} */
#define NGX_SMTP_EXT_M_REDIS_OK       0
#define NGX_SMTP_EXT_M_REDIS_ERROR    1
#define NGX_SMTP_EXT_M_REDIS_TIMEOUT  2

/* smtp_ext_redis_cache_total{result} */
#define NGX_SMTP_EXT_M_CACHE_HIT    0
#define NGX_SMTP_EXT_M_CACHE_MISS   1
#define NGX_SMTP_EXT_M_CACHE_STALE  2

/* smtp_ext_ratelimit_total{event,key,action} */
#define NGX_SMTP_EXT_M_EV_CONNECT   0
#define NGX_SMTP_EXT_M_EV_MAIL      1
#define NGX_SMTP_EXT_M_EV_RCPT      2
#define NGX_SMTP_EXT_M_KEY_IP             0
#define NGX_SMTP_EXT_M_KEY_USER           1
#define NGX_SMTP_EXT_M_KEY_SENDER         2
#define NGX_SMTP_EXT_M_KEY_SENDER_DOMAIN  3
#define NGX_SMTP_EXT_M_KEY_RCPT_DOMAIN    4
#define NGX_SMTP_EXT_M_ALLOW        0
#define NGX_SMTP_EXT_M_REJECT       1
#define NGX_SMTP_EXT_M_ERROR        2


/* configuration and processes (ngx_mail_smtp_ext_module.c) */
ngx_int_t ngx_mail_smtp_ext_metrics_conf(ngx_conf_t *cf, void *smcf,
    ngx_mail_protocol_t *protocol);
ngx_int_t ngx_mail_smtp_ext_metrics_init_process(ngx_cycle_t *cycle);
void ngx_mail_smtp_ext_metrics_exit_process(ngx_cycle_t *cycle);

/* for the http status module */
ngx_shm_zone_t *ngx_mail_smtp_ext_metrics_zone(ngx_conf_t *cf);
ngx_int_t ngx_mail_smtp_ext_metrics_render(ngx_shm_zone_t *zone,
    ngx_pool_t *pool, ngx_chain_t **out, off_t *len);

/* the session (ngx_mail_smtp_ext_session.c) */
void ngx_mail_smtp_ext_metric_session(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_metric_line(ngx_mail_session_t *s, u_char *line,
    size_t len);
void ngx_mail_smtp_ext_metric_rcpt(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_metric_reply(ngx_mail_session_t *s, u_char *reply,
    size_t len);
void ngx_mail_smtp_ext_metric_starttls(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_metric_data(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_metric_dot(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_metric_relayed(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_metric_data_end(ngx_mail_session_t *s);
void ngx_mail_smtp_ext_tx_log(ngx_mail_session_t *s);

/* AUTH (ngx_mail_smtp_ext_auth.c): NGX_OK, NGX_DECLINED, or tempfail */
void ngx_mail_smtp_ext_metric_auth(ngx_mail_session_t *s, ngx_int_t rc);

/* edge protection (SPEC 10) */
void ngx_mail_smtp_ext_metric_reject(ngx_mail_session_t *s,
    ngx_uint_t reason);
void ngx_mail_smtp_ext_metric_ratelimit(ngx_uint_t event, ngx_uint_t key,
    ngx_uint_t action);

/* Redis (ngx_mail_smtp_ext_redis.c) and its cache (SPEC 11) */
void ngx_mail_smtp_ext_metric_redis(ngx_uint_t result);
void ngx_mail_smtp_ext_metric_cache(ngx_uint_t result);


#endif /* _NGX_MAIL_SMTP_EXT_METRICS_H_INCLUDED_ */
