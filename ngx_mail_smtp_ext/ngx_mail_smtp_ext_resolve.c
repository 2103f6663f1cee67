
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * The client's host name for XCLIENT NAME=, with the mail core's
 * "resolver": a PTR lookup, then a forward lookup that must lead back to
 * the client's address, as stock nginx SMTP and Postfix do.  The greeting
 * waits for it (bounded by resolver_timeout).
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>

#include "ngx_mail_smtp_ext_module.h"


static void ngx_mail_smtp_ext_resolve_addr_handler(ngx_resolver_ctx_t *rctx);
static void ngx_mail_smtp_ext_resolve_name_handler(ngx_resolver_ctx_t *rctx);
static void ngx_mail_smtp_ext_resolve_done(ngx_mail_session_t *s,
    ngx_str_t *host);
static ngx_uint_t ngx_mail_smtp_ext_valid_host(ngx_str_t *host);
static void ngx_mail_smtp_ext_resolve_cleanup(void *data);


static ngx_str_t  ngx_mail_smtp_ext_unavailable = ngx_string("[UNAVAILABLE]");
static ngx_str_t  ngx_mail_smtp_ext_tempunavail = ngx_string("[TEMPUNAVAIL]");


/* NGX_OK: resolving, the greeting comes later; NGX_DECLINED: no resolver */

ngx_int_t
ngx_mail_smtp_ext_resolve(ngx_mail_session_t *s)
{
    ngx_connection_t          *c;
    ngx_resolver_ctx_t        *rctx;
    ngx_pool_cleanup_t        *cln;
    ngx_mail_core_srv_conf_t  *cscf;

    c = s->connection;
    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);

    s->host = ngx_mail_smtp_ext_unavailable;

    if (cscf->resolver == NULL) {
        return NGX_DECLINED;
    }

#if (NGX_HAVE_UNIX_DOMAIN)
    if (c->sockaddr->sa_family == AF_UNIX) {
        s->host = ngx_mail_smtp_ext_tempunavail;
        return NGX_DECLINED;
    }
#endif

    cln = ngx_pool_cleanup_add(c->pool, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    cln->handler = ngx_mail_smtp_ext_resolve_cleanup;
    cln->data = s;

    rctx = ngx_resolve_start(cscf->resolver, NULL);
    if (rctx == NULL) {
        return NGX_ERROR;
    }

    rctx->addr.sockaddr = c->sockaddr;
    rctx->addr.socklen = c->socklen;
    rctx->handler = ngx_mail_smtp_ext_resolve_addr_handler;
    rctx->data = s;
    rctx->timeout = cscf->resolver_timeout;

    s->resolver_ctx = rctx;

    c->log->action = "in resolving client address";

    if (ngx_resolve_addr(rctx) != NGX_OK) {
        s->resolver_ctx = NULL;
        return NGX_ERROR;
    }

    return NGX_OK;
}


static void
ngx_mail_smtp_ext_resolve_addr_handler(ngx_resolver_ctx_t *rctx)
{
    ngx_int_t                  state;
    ngx_str_t                  name;
    ngx_connection_t          *c;
    ngx_mail_session_t        *s;
    ngx_mail_core_srv_conf_t  *cscf;

    s = rctx->data;
    c = s->connection;

    state = rctx->state;

    if (state) {
        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "%V could not be resolved (%i: %s)", &c->addr_text,
                      state, ngx_resolver_strerror(state));

        /* the context is freed here: only the saved state is used after */

        ngx_resolve_addr_done(rctx);
        s->resolver_ctx = NULL;

        ngx_mail_smtp_ext_resolve_done(s, state == NGX_RESOLVE_NXDOMAIN
                                          ? &ngx_mail_smtp_ext_unavailable
                                          : &ngx_mail_smtp_ext_tempunavail);
        return;
    }

    name.len = rctx->name.len;
    name.data = ngx_pstrdup(c->pool, &rctx->name);

    ngx_resolve_addr_done(rctx);
    s->resolver_ctx = NULL;

    if (name.data == NULL || !ngx_mail_smtp_ext_valid_host(&name)) {
        ngx_mail_smtp_ext_resolve_done(s, &ngx_mail_smtp_ext_unavailable);
        return;
    }

    /* forward-confirm: the name must lead back to the client */

    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);

    rctx = ngx_resolve_start(cscf->resolver, NULL);
    if (rctx == NULL) {
        ngx_mail_smtp_ext_resolve_done(s, &ngx_mail_smtp_ext_tempunavail);
        return;
    }

    rctx->name = name;
    rctx->handler = ngx_mail_smtp_ext_resolve_name_handler;
    rctx->data = s;
    rctx->timeout = cscf->resolver_timeout;

    s->resolver_ctx = rctx;
    s->host = name;

    c->log->action = "in resolving client hostname";

    if (ngx_resolve_name(rctx) != NGX_OK) {
        s->resolver_ctx = NULL;
        ngx_mail_smtp_ext_resolve_done(s, &ngx_mail_smtp_ext_tempunavail);
    }
}


static void
ngx_mail_smtp_ext_resolve_name_handler(ngx_resolver_ctx_t *rctx)
{
    ngx_str_t            host;
    ngx_uint_t           i;
    ngx_connection_t    *c;
    ngx_mail_session_t  *s;

    s = rctx->data;
    c = s->connection;

    host = ngx_mail_smtp_ext_unavailable;

    if (rctx->state) {
        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "\"%V\" could not be resolved (%i: %s)", &rctx->name,
                      rctx->state, ngx_resolver_strerror(rctx->state));

        if (rctx->state != NGX_RESOLVE_NXDOMAIN) {
            host = ngx_mail_smtp_ext_tempunavail;
        }

    } else {
        for (i = 0; i < rctx->naddrs; i++) {
            if (ngx_cmp_sockaddr(rctx->addrs[i].sockaddr,
                                 rctx->addrs[i].socklen,
                                 c->sockaddr, c->socklen, 0)
                == NGX_OK)
            {
                host = s->host;
                break;
            }
        }
    }

    ngx_resolve_name_done(rctx);
    s->resolver_ctx = NULL;

    ngx_mail_smtp_ext_resolve_done(s, &host);
}


static void
ngx_mail_smtp_ext_resolve_done(ngx_mail_session_t *s, ngx_str_t *host)
{
    s->host = *host;
    s->connection->log->action = "in smtp_ext session";

    ngx_mail_smtp_ext_greet(s);
}


/* RFC 1034 3.5 letters, digits, '-' and '.': the name goes to backends */

static ngx_uint_t
ngx_mail_smtp_ext_valid_host(ngx_str_t *host)
{
    u_char      ch;
    ngx_uint_t  i;

    if (host->len == 0 || host->len > 253) {
        return 0;
    }

    for (i = 0; i < host->len; i++) {
        ch = host->data[i];

        if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z')
            || (ch >= '0' && ch <= '9') || ch == '-' || ch == '.')
        {
            continue;
        }

        return 0;
    }

    return 1;
}


/* the client left while a lookup was pending */

static void
ngx_mail_smtp_ext_resolve_cleanup(void *data)
{
    ngx_mail_session_t  *s = data;

    ngx_resolver_ctx_t  *rctx;

    rctx = s->resolver_ctx;

    if (rctx == NULL) {
        return;
    }

    s->resolver_ctx = NULL;

    if (rctx->handler == ngx_mail_smtp_ext_resolve_addr_handler) {
        ngx_resolve_addr_done(rctx);

    } else {
        ngx_resolve_name_done(rctx);
    }
}
