
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * Where a recipient goes (SPEC 4): the authenticated user's route, else
 * rcpt:ADDRESS, else domain:DOMAIN (one Redis round trip for both), else
 * smtp_ext_pass for authenticated clients only.  Targets from Redis are
 * pool names or IP:port literals, never resolved at run time.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>

#include "ngx_mail_smtp_ext_module.h"
#include "ngx_mail_smtp_ext_redis.h"


/* pools made at run time for IP:port targets, per worker */
#define NGX_MAIL_SMTP_EXT_MAX_TARGETS  1024


static ngx_str_t  ngx_smtp_ext_relay_denied = ngx_string(
    "554 5.7.1 Relay access denied" CRLF);
static ngx_str_t  ngx_smtp_ext_rejected = ngx_string(
    "550 5.1.1 Recipient address rejected" CRLF);
static ngx_str_t  ngx_smtp_ext_lookup_failed = ngx_string(
    "451 4.3.0 Temporary lookup failure, try again later" CRLF);
static ngx_str_t  ngx_smtp_ext_bad_route = ngx_string(
    "451 4.3.0 Invalid route for recipient, try again later" CRLF);


static void ngx_mail_smtp_ext_route_looked_up(void *data,
    redisReply **replies, ngx_uint_t n);
static ngx_int_t ngx_mail_smtp_ext_route_target(ngx_mail_session_t *s,
    u_char *target, size_t len);
static ngx_mail_smtp_ext_pool_t *ngx_mail_smtp_ext_runtime_pool(
    ngx_mail_session_t *s, ngx_str_t *target);


static ngx_array_t  *ngx_mail_smtp_ext_targets;


ngx_int_t
ngx_mail_smtp_ext_route(ngx_mail_session_t *s, ngx_str_t *rcpt)
{
    u_char                        *at;
    ngx_str_t                      domain, rcpt_key, domain_key;
    ngx_uint_t                     n;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;
    ngx_mail_smtp_ext_redis_cmd_t  cmds[2];
    const char                    *argv[4];
    size_t                         argvlen[4];

    static const char  *get = "GET";

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    if (sscf->redis == NULL) {
        /* no policy of our own: the backend decides */
        ctx->pending_route = sscf->pass;
        return NGX_OK;
    }

    if (s->login.len && ctx->user_route.len) {
        return ngx_mail_smtp_ext_route_target(s, ctx->user_route.data,
                                              ctx->user_route.len);
    }

    if (ngx_mail_smtp_ext_redis_key(ctx->tpool, sscf->redis, "rcpt:", rcpt,
                                    1, &rcpt_key)
        != NGX_OK)
    {
        ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_lookup_failed);
        return NGX_DECLINED;
    }

    argv[0] = get;
    argvlen[0] = 3;
    argv[1] = (const char *) rcpt_key.data;
    argvlen[1] = rcpt_key.len;

    cmds[0].argc = 2;
    cmds[0].argv = &argv[0];
    cmds[0].argvlen = &argvlen[0];

    n = 1;

    at = NULL;

    if (rcpt->len) {
        for (at = rcpt->data + rcpt->len - 1; at > rcpt->data; at--) {
            if (*at == '@') {
                break;
            }
        }
    }

    if (at && *at == '@' && at + 1 < rcpt->data + rcpt->len) {
        domain.data = at + 1;
        domain.len = rcpt->data + rcpt->len - domain.data;

        if (ngx_mail_smtp_ext_redis_key(ctx->tpool, sscf->redis, "domain:",
                                        &domain, 1, &domain_key)
            != NGX_OK)
        {
            ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_lookup_failed);
            return NGX_DECLINED;
        }

        argv[2] = get;
        argvlen[2] = 3;
        argv[3] = (const char *) domain_key.data;
        argvlen[3] = domain_key.len;

        cmds[1].argc = 2;
        cmds[1].argv = &argv[2];
        cmds[1].argvlen = &argvlen[2];

        n = 2;
    }

    if (ngx_mail_smtp_ext_redis_query(sscf->redis, c->pool, cmds, n,
                                      ngx_mail_smtp_ext_route_looked_up, s)
        != NGX_OK)
    {
        ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_lookup_failed);
        return NGX_DECLINED;
    }

    ngx_mail_smtp_ext_wait_lookup(s);

    return NGX_AGAIN;
}


static void
ngx_mail_smtp_ext_route_looked_up(void *data, redisReply **replies,
    ngx_uint_t n)
{
    ngx_mail_session_t *s = data;

    ngx_int_t                      rc;
    redisReply                    *r;
    ngx_uint_t                     i;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    if (replies == NULL) {
        ngx_log_error(NGX_LOG_ERR, s->connection->log, 0,
                      "smtp_ext: Redis lookup for RCPT failed");
        ngx_mail_smtp_ext_lookup_done(s, &ngx_smtp_ext_lookup_failed);
        return;
    }

    for (i = 0; i < n; i++) {
        r = replies[i];

        if (r->type == REDIS_REPLY_NIL) {
            continue;
        }

        if (r->type != REDIS_REPLY_STRING || r->len == 0) {
            ngx_log_error(NGX_LOG_ERR, s->connection->log, 0,
                          "smtp_ext: unexpected Redis reply type %d for "
                          "a route", r->type);
            ngx_mail_smtp_ext_lookup_done(s, &ngx_smtp_ext_lookup_failed);
            return;
        }

        if (i == 0 && r->len == 6
            && ngx_strncasecmp((u_char *) r->str, (u_char *) "reject", 6)
               == 0)
        {
            ngx_mail_smtp_ext_lookup_done(s, &ngx_smtp_ext_rejected);
            return;
        }

        rc = ngx_mail_smtp_ext_route_target(s, (u_char *) r->str, r->len);

        if (rc == NGX_OK) {
            ngx_mail_smtp_ext_rcpt_routed(s);

        } else {
            ngx_mail_smtp_ext_lookup_done(s, NULL);
        }

        return;
    }

    /*
     * No route: only an authenticated client may relay; "<postmaster>"
     * must always be taken (RFC 5321 4.5.1).
     */

    if (sscf->pass && (s->login.len || n == 1)) {
        ctx->pending_route = sscf->pass;
        ngx_mail_smtp_ext_rcpt_routed(s);
        return;
    }

    ngx_mail_smtp_ext_lookup_done(s, &ngx_smtp_ext_relay_denied);
}


/* NGX_OK with ctx->pending_route set, or NGX_DECLINED with a reply queued */

static ngx_int_t
ngx_mail_smtp_ext_route_target(ngx_mail_session_t *s, u_char *target,
    size_t len)
{
    ngx_str_t                       name;
    ngx_uint_t                      i;
    ngx_mail_smtp_ext_ctx_t        *ctx;
    ngx_mail_smtp_ext_pool_t      **pools, *pool;
    ngx_mail_smtp_ext_main_conf_t  *smcf;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    smcf = ngx_mail_get_module_main_conf(s, ngx_mail_smtp_ext_module);

    name.data = target;
    name.len = len;

    pools = smcf->pools.elts;

    for (i = 0; i < smcf->pools.nelts; i++) {
        if (pools[i]->name.len == len
            && ngx_strncmp(pools[i]->name.data, target, len) == 0)
        {
            ctx->pending_route = pools[i];
            return NGX_OK;
        }
    }

    pool = ngx_mail_smtp_ext_runtime_pool(s, &name);

    if (pool == NULL) {
        ngx_log_error(NGX_LOG_ERR, s->connection->log, 0,
                      "smtp_ext: invalid route \"%V\": not a pool name nor "
                      "an IP:port", &name);
        ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_bad_route);
        return NGX_DECLINED;
    }

    ctx->pending_route = pool;

    return NGX_OK;
}


/*
 * "IP:port" from Redis: a one-server pool kept for the worker's life so
 * that balancing state and backend reuse work as for configured pools.
 */

static ngx_mail_smtp_ext_pool_t *
ngx_mail_smtp_ext_runtime_pool(ngx_mail_session_t *s, ngx_str_t *target)
{
    ngx_int_t                   rc;
    ngx_uint_t                  i;
    ngx_addr_t                  addr;
    ngx_pool_t                 *p;
    ngx_mail_smtp_ext_peer_t   *peer;
    ngx_mail_smtp_ext_pool_t  **pools, *pool;

    if (ngx_mail_smtp_ext_targets == NULL) {
        ngx_mail_smtp_ext_targets = ngx_array_create(ngx_cycle->pool, 16,
                                          sizeof(ngx_mail_smtp_ext_pool_t *));
        if (ngx_mail_smtp_ext_targets == NULL) {
            return NULL;
        }
    }

    pools = ngx_mail_smtp_ext_targets->elts;

    for (i = 0; i < ngx_mail_smtp_ext_targets->nelts; i++) {
        if (pools[i]->name.len == target->len
            && ngx_strncmp(pools[i]->name.data, target->data, target->len)
               == 0)
        {
            return pools[i];
        }
    }

    if (ngx_mail_smtp_ext_targets->nelts >= NGX_MAIL_SMTP_EXT_MAX_TARGETS) {
        ngx_log_error(NGX_LOG_ERR, s->connection->log, 0,
                      "smtp_ext: more than %d IP:port routes",
                      NGX_MAIL_SMTP_EXT_MAX_TARGETS);
        return NULL;
    }

    p = ngx_cycle->pool;

    rc = ngx_parse_addr_port(p, &addr, target->data, target->len);
    if (rc != NGX_OK || ngx_inet_get_port(addr.sockaddr) == 0) {
        return NULL;
    }

    pool = ngx_pcalloc(p, sizeof(ngx_mail_smtp_ext_pool_t));
    if (pool == NULL) {
        return NULL;
    }

    pool->name.data = ngx_pstrdup(p, target);
    if (pool->name.data == NULL) {
        return NULL;
    }

    pool->name.len = target->len;
    pool->implicit = 1;

    if (ngx_array_init(&pool->peers, p, 1, sizeof(ngx_mail_smtp_ext_peer_t))
        != NGX_OK)
    {
        return NULL;
    }

    peer = ngx_array_push(&pool->peers);
    if (peer == NULL) {
        return NULL;
    }

    ngx_memzero(peer, sizeof(ngx_mail_smtp_ext_peer_t));

    peer->sockaddr = addr.sockaddr;
    peer->socklen = addr.socklen;
    peer->name = pool->name;
    peer->server = pool->name;
    peer->weight = 1;
    peer->max_fails = 1;
    peer->fail_timeout = 10;
    ngx_mail_smtp_ext_pool_init_peer(peer);
    ngx_queue_init(&pool->cache);

    pools = ngx_array_push(ngx_mail_smtp_ext_targets);
    if (pools == NULL) {
        return NULL;
    }

    *pools = pool;

    return pool;
}
