
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * DNS blocklists and the greeting delay (SPEC §10): the lookups of every
 * smtp_ext_dnsbl zone go out at once through the mail "resolver", in
 * parallel with smtp_ext_greeting_delay; the greeting waits for both.
 * A client that talks before the greeting ("pregreet", as Postfix's
 * postscreen calls it) is refused.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>

#include "ngx_mail_smtp_ext_module.h"
#include "ngx_mail_smtp_ext_edge.h"


static void ngx_mail_smtp_ext_dnsbl_handler(ngx_resolver_ctx_t *rctx);
static ngx_int_t ngx_mail_smtp_ext_dnsbl_verdict(ngx_mail_session_t *s);
static ngx_uint_t ngx_mail_smtp_ext_dnsbl_listed(
    ngx_mail_smtp_ext_dnsbl_t *bl, ngx_resolver_ctx_t *rctx);
static ngx_int_t ngx_mail_smtp_ext_dnsbl_name(ngx_mail_session_t *s,
    ngx_str_t *zone, ngx_str_t *name);
static void ngx_mail_smtp_ext_delay_handler(ngx_event_t *ev);
static void ngx_mail_smtp_ext_edge_unhold(ngx_mail_session_t *s);


static ngx_str_t  ngx_mail_smtp_ext_pregreet =
    ngx_string("554 5.5.1 Protocol error: talking before the greeting" CRLF);


/* smtp_ext_dnsbl ZONE[=A.B.C.D[,A.B.C.D...]][*WEIGHT] ... */

char *
ngx_mail_smtp_ext_dnsbl(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_mail_smtp_ext_srv_conf_t *sscf = conf;

    u_char                     *p, *last, *star, *eq, *comma;
    ngx_int_t                   n;
    ngx_str_t                  *value, arg;
    in_addr_t                   addr, *a;
    ngx_uint_t                  i;
    ngx_mail_smtp_ext_dnsbl_t  *bl;

    if (sscf->dnsbl) {
        return "is duplicate";
    }

    sscf->dnsbl = ngx_array_create(cf->pool, cf->args->nelts - 1,
                                   sizeof(ngx_mail_smtp_ext_dnsbl_t));
    if (sscf->dnsbl == NULL) {
        return NGX_CONF_ERROR;
    }

    value = cf->args->elts;

    if (cf->args->nelts == 2 && ngx_strcmp(value[1].data, "off") == 0) {
        return NGX_CONF_OK;
    }

    for (i = 1; i < cf->args->nelts; i++) {
        arg = value[i];

        bl = ngx_array_push(sscf->dnsbl);
        if (bl == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_memzero(bl, sizeof(ngx_mail_smtp_ext_dnsbl_t));
        bl->weight = 1;

        last = arg.data + arg.len;

        star = ngx_strlchr(arg.data, last, '*');

        if (star) {
            n = ngx_atoi(star + 1, last - star - 1);
            if (n == NGX_ERROR || n == 0) {
                goto invalid;
            }

            bl->weight = n;
            last = star;
        }

        eq = ngx_strlchr(arg.data, last, '=');

        bl->zone.data = arg.data;
        bl->zone.len = (eq ? eq : last) - arg.data;

        if (bl->zone.len == 0 || bl->zone.data[0] == '.'
            || bl->zone.data[bl->zone.len - 1] == '.')
        {
            goto invalid;
        }

        if (eq == NULL) {
            continue;
        }

        bl->answers = ngx_array_create(cf->pool, 2, sizeof(in_addr_t));
        if (bl->answers == NULL) {
            return NGX_CONF_ERROR;
        }

        for (p = eq + 1; p < last; p = comma + 1) {
            comma = ngx_strlchr(p, last, ',');
            if (comma == NULL) {
                comma = last;
            }

            addr = ngx_inet_addr(p, comma - p);
            if (addr == INADDR_NONE) {
                goto invalid;
            }

            a = ngx_array_push(bl->answers);
            if (a == NULL) {
                return NGX_CONF_ERROR;
            }

            *a = addr;
        }

        if (bl->answers->nelts == 0) {
            goto invalid;
        }
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid DNSBL \"%V\"", &value[i]);
    return NGX_CONF_ERROR;
}


/* the rest of the edge merge: DNSBL needs the mail "resolver" */

char *
ngx_mail_smtp_ext_dnsbl_merge(ngx_conf_t *cf, void *conf)
{
    ngx_mail_smtp_ext_srv_conf_t  *sscf = conf;

    ngx_mail_core_srv_conf_t  *cscf;

    if (sscf->dnsbl == NULL || sscf->dnsbl->nelts == 0) {
        return NGX_CONF_OK;
    }

    cscf = ngx_mail_conf_get_module_srv_conf(cf, ngx_mail_core_module);

    if (cscf->resolver == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"smtp_ext_dnsbl\" needs a \"resolver\" "
                      "in %s:%ui", sscf->file_name, sscf->line);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * After the "connect" rate limit: the DNSBL lookups and the greeting
 * delay, together.  NGX_OK: going on (or nothing to do: the greeting is
 * let go); NGX_DONE: the session was refused or closed.
 */

ngx_int_t
ngx_mail_smtp_ext_dnsbl_start(ngx_mail_session_t *s)
{
    ngx_uint_t                     i, n;
    ngx_str_t                      name;
    ngx_connection_t              *c;
    ngx_resolver_ctx_t            *rctx;
    ngx_mail_smtp_ext_edge_t      *edge;
    ngx_mail_smtp_ext_dnsbl_t     *bl;
    ngx_mail_core_srv_conf_t      *cscf;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    c = s->connection;
    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    edge = ngx_mail_smtp_ext_edge_get(s);

    if (sscf->greeting_delay) {
        edge->delay.handler = ngx_mail_smtp_ext_delay_handler;
        edge->delay.data = s;
        edge->delay.log = c->log;
        edge->delaying = 1;

        ngx_add_timer(&edge->delay, sscf->greeting_delay);

        /* input that came with the connection is pregreet too */

        if (c->read->ready) {
            ngx_post_event(c->read, &ngx_posted_events);
        }
    }

    n = (sscf->dnsbl && c->sockaddr->sa_family != AF_UNIX)
        ? sscf->dnsbl->nelts : 0;

    if (n) {
        edge->dnsbl_ctx = ngx_pcalloc(c->pool,
                                      n * (sizeof(ngx_resolver_ctx_t *)
                                           + sizeof(ngx_uint_t)));
        if (edge->dnsbl_ctx == NULL) {
            goto failed;
        }

        edge->dnsbl_weight = (ngx_uint_t *) (edge->dnsbl_ctx + n);

        bl = sscf->dnsbl->elts;

        /*
         * A cached answer calls the handler from inside
         * ngx_resolve_name(): "starting" makes it only record the result,
         * the verdict comes after the loop.
         */

        edge->dnsbl_pending = n;
        edge->dnsbl_starting = 1;

        for (i = 0; i < n; i++) {
            if (ngx_mail_smtp_ext_dnsbl_name(s, &bl[i].zone, &name)
                != NGX_OK)
            {
                goto failed;
            }

            rctx = ngx_resolve_start(cscf->resolver, NULL);
            if (rctx == NULL || rctx == NGX_NO_RESOLVER) {
                /* a resolver failure counts as not listed */
                edge->dnsbl_pending--;
                continue;
            }

            rctx->name = name;
            rctx->handler = ngx_mail_smtp_ext_dnsbl_handler;
            rctx->data = s;
            rctx->timeout = cscf->resolver_timeout;

            edge->dnsbl_ctx[i] = rctx;

            if (ngx_resolve_name(rctx) != NGX_OK) {
                if (edge->dnsbl_ctx[i]) {
                    edge->dnsbl_ctx[i] = NULL;
                    edge->dnsbl_pending--;
                }
            }
        }
    }

    edge->dnsbl_starting = 0;

    return ngx_mail_smtp_ext_dnsbl_verdict(s);

failed:

    ngx_mail_close_connection(c);
    return NGX_DONE;
}


/* "d.c.b.a.ZONE", or the 32 nibbles of an IPv6 address and ".ZONE" */

static ngx_int_t
ngx_mail_smtp_ext_dnsbl_name(ngx_mail_session_t *s, ngx_str_t *zone,
    ngx_str_t *name)
{
    u_char               *p, *a;
    struct sockaddr_in   *sin;
#if (NGX_HAVE_INET6)
    ngx_int_t             i;
    struct sockaddr_in6  *sin6;
#endif

    p = ngx_pnalloc(s->connection->pool, 64 + zone->len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    name->data = p;

    switch (s->connection->sockaddr->sa_family) {

#if (NGX_HAVE_INET6)
    case AF_INET6:
        sin6 = (struct sockaddr_in6 *) s->connection->sockaddr;
        a = sin6->sin6_addr.s6_addr;

        if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
            p = ngx_sprintf(p, "%ud.%ud.%ud.%ud.", a[15], a[14], a[13], a[12]);
            break;
        }

        for (i = 15; i >= 0; i--) {
            p = ngx_sprintf(p, "%xd.%xd.", a[i] & 0xf, a[i] >> 4);
        }

        break;
#endif

    default: /* AF_INET */
        sin = (struct sockaddr_in *) s->connection->sockaddr;
        a = (u_char *) &sin->sin_addr;
        p = ngx_sprintf(p, "%ud.%ud.%ud.%ud.", a[3], a[2], a[1], a[0]);
        break;
    }

    p = ngx_cpymem(p, zone->data, zone->len);
    name->len = p - name->data;

    return NGX_OK;
}


static void
ngx_mail_smtp_ext_dnsbl_handler(ngx_resolver_ctx_t *rctx)
{
    ngx_uint_t                     i;
    ngx_mail_session_t            *s;
    ngx_mail_smtp_ext_edge_t      *edge;
    ngx_mail_smtp_ext_dnsbl_t     *bl;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    s = rctx->data;
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);
    edge = ngx_mail_smtp_ext_edge_get(s);

    bl = sscf->dnsbl->elts;

    for (i = 0; i < sscf->dnsbl->nelts; i++) {
        if (edge->dnsbl_ctx[i] == rctx) {
            break;
        }
    }

    if (i == sscf->dnsbl->nelts) {
        /* cannot happen: every context is known */
        ngx_resolve_name_done(rctx);
        return;
    }

    if (rctx->state == 0 && ngx_mail_smtp_ext_dnsbl_listed(&bl[i], rctx)) {
        edge->dnsbl_weight[i] = bl[i].weight;
    }

    if (rctx->state && rctx->state != NGX_RESOLVE_NXDOMAIN) {
        ngx_log_error(NGX_LOG_INFO, s->connection->log, 0,
                      "smtp_ext: DNSBL lookup \"%V\" failed (%i: %s), "
                      "not listed", &rctx->name, rctx->state,
                      ngx_resolver_strerror(rctx->state));
    }

    ngx_resolve_name_done(rctx);
    edge->dnsbl_ctx[i] = NULL;
    edge->dnsbl_pending--;

    if (edge->dnsbl_starting || edge->done) {
        /* from inside ngx_resolve_name() in dnsbl_start(): it decides */
        return;
    }

    (void) ngx_mail_smtp_ext_dnsbl_verdict(s);
}


/* an answer in the zone's list, or any 127.0.0.0/8 answer without one */

static ngx_uint_t
ngx_mail_smtp_ext_dnsbl_listed(ngx_mail_smtp_ext_dnsbl_t *bl,
    ngx_resolver_ctx_t *rctx)
{
    in_addr_t            addr, *a;
    ngx_uint_t           i, j;
    struct sockaddr_in  *sin;

    for (i = 0; i < rctx->naddrs; i++) {
        if (rctx->addrs[i].sockaddr->sa_family != AF_INET) {
            continue;
        }

        sin = (struct sockaddr_in *) rctx->addrs[i].sockaddr;
        addr = sin->sin_addr.s_addr;

        if (bl->answers == NULL) {
            if ((ntohl(addr) >> 24) == 127) {
                return 1;
            }

            continue;
        }

        a = bl->answers->elts;

        for (j = 0; j < bl->answers->nelts; j++) {
            if (a[j] == addr) {
                return 1;
            }
        }
    }

    return 0;
}


/*
 * Refuses once the listings that counted reach the threshold and no
 * zone before the first of them (directive order) is still pending, so
 * that the reply names the same zone whatever order answers come in.
 * Lets the greeting go when every lookup is over and the delay too.
 */

static ngx_int_t
ngx_mail_smtp_ext_dnsbl_verdict(ngx_mail_session_t *s)
{
    u_char                        *p;
    ngx_str_t                      reply;
    ngx_uint_t                     i, n, sum, first, earlier;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_edge_t      *edge;
    ngx_mail_smtp_ext_dnsbl_t     *bl;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;
    u_char                         text[NGX_SOCKADDR_STRLEN + 512];

    c = s->connection;
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);
    edge = ngx_mail_smtp_ext_edge_get(s);

    n = edge->dnsbl_ctx ? sscf->dnsbl->nelts : 0;
    sum = 0;
    first = n;
    earlier = 0;

    for (i = 0; i < n; i++) {
        if (edge->dnsbl_weight[i]) {
            sum += edge->dnsbl_weight[i];

            if (first == n) {
                first = i;
            }

        } else if (first == n && edge->dnsbl_ctx[i]) {
            earlier = 1;
        }
    }

    if (first < n && sum >= sscf->dnsbl_threshold && !earlier) {
        bl = sscf->dnsbl->elts;

        p = ngx_snprintf(text, sizeof(text) - 2,
                         "554 5.7.1 Service unavailable; client [%V] "
                         "blocked using %V", &c->addr_text, &bl[first].zone);
        *p++ = CR; *p++ = LF;

        reply.data = text;
        reply.len = p - text;

        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "smtp_ext: client %V listed in DNSBL %V (score %ui)",
                      &c->addr_text, &bl[first].zone, sum);

        ngx_mail_smtp_ext_metric_reject(s, NGX_SMTP_EXT_M_DNSBL);
        ngx_mail_smtp_ext_edge_refuse(s, &reply, "DNSBL");
        return NGX_DONE;
    }

    if (edge->dnsbl_pending || edge->delaying) {
        return NGX_OK;
    }

    ngx_mail_smtp_ext_edge_unhold(s);

    return NGX_OK;
}


static void
ngx_mail_smtp_ext_delay_handler(ngx_event_t *ev)
{
    ngx_mail_session_t        *s;
    ngx_mail_smtp_ext_edge_t  *edge;

    s = ev->data;
    edge = ngx_mail_smtp_ext_edge_get(s);

    edge->delaying = 0;

    if (edge->done || edge->dnsbl_pending) {
        return;
    }

    ngx_mail_smtp_ext_edge_unhold(s);
}


/* every check passed: the greeting, if the session asked for it */

static void
ngx_mail_smtp_ext_edge_unhold(ngx_mail_session_t *s)
{
    ngx_connection_t          *c;
    ngx_mail_smtp_ext_edge_t  *edge;

    c = s->connection;
    edge = ngx_mail_smtp_ext_edge_get(s);

    if (!edge->holding) {
        return;
    }

    edge->holding = 0;

    if (c->read->handler == ngx_mail_smtp_ext_pregreet_handler) {
        c->read->handler = ngx_mail_smtp_ext_auth_state;
    }

    if (edge->greet_wanted) {
        edge->greet_wanted = 0;
        ngx_mail_smtp_ext_greet(s);
    }
}


/* the read handler while the greeting is held back by a greeting delay */

void
ngx_mail_smtp_ext_pregreet_handler(ngx_event_t *rev)
{
    ssize_t              n;
    ngx_connection_t    *c;
    ngx_mail_session_t  *s;
    u_char               buf[64];

    c = rev->data;
    s = c->data;

    if (rev->timedout || c->close) {
        ngx_mail_smtp_ext_auth_state(rev);
        return;
    }

    n = c->recv(c, buf, sizeof(buf));

    if (n > 0) {
        ngx_mail_smtp_ext_metric_reject(s, NGX_SMTP_EXT_M_PREGREET);
        ngx_mail_smtp_ext_edge_refuse(s, &ngx_mail_smtp_ext_pregreet,
                                      "talking before the greeting");
        return;
    }

    if (n == NGX_AGAIN) {
        if (ngx_handle_read_event(rev, 0) != NGX_OK) {
            ngx_mail_close_connection(c);
        }

        return;
    }

    ngx_log_error(NGX_LOG_INFO, c->log, 0,
                  "client closed the connection before the greeting");

    ngx_mail_close_connection(c);
}
