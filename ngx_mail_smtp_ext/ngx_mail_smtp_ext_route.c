
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
#include "ngx_mail_smtp_ext_cache.h"
#include "ngx_mail_smtp_ext_redis.h"


/* pools made at run time for IP:port targets, per worker */
#define NGX_MAIL_SMTP_EXT_MAX_TARGETS  256


/*
 * A one-server pool for an "IP:port" from Redis.  Sessions that route to
 * it hold it (refs); only an entry no session holds is ever freed, when
 * the cache is full and the entry is the least recently used.
 */

typedef struct {
    ngx_queue_t                     queue;      /* most recent first */
    ngx_uint_t                      refs;
    ngx_mail_smtp_ext_pool_t        pool;
    ngx_mail_smtp_ext_peer_t        peer;
    ngx_sockaddr_t                  sockaddr;
    u_char                          name[NGX_SMTP_ROUTE_MAX];
} ngx_mail_smtp_ext_target_t;


static ngx_str_t  ngx_smtp_ext_relay_denied = ngx_string(
    "554 5.7.1 Relay access denied" CRLF);
static ngx_str_t  ngx_smtp_ext_rejected = ngx_string(
    "550 5.1.1 Recipient address rejected" CRLF);
static ngx_str_t  ngx_smtp_ext_lookup_failed = ngx_string(
    "451 4.3.0 Temporary lookup failure, try again later" CRLF);
static ngx_str_t  ngx_smtp_ext_bad_route = ngx_string(
    "451 4.3.0 Invalid route for recipient, try again later" CRLF);


static ngx_int_t ngx_mail_smtp_ext_route_fail(ngx_mail_session_t *s);
static ngx_int_t ngx_mail_smtp_ext_route_stale(ngx_mail_session_t *s);
static ngx_int_t ngx_mail_smtp_ext_route_decide(ngx_mail_session_t *s,
    ngx_str_t *vals, ngx_uint_t n);
static void ngx_mail_smtp_ext_route_looked_up(void *data,
    redisReply **replies, ngx_uint_t n);
static ngx_int_t ngx_mail_smtp_ext_route_target(ngx_mail_session_t *s,
    u_char *target, size_t len);
static ngx_mail_smtp_ext_target_t *ngx_mail_smtp_ext_runtime_pool(
    ngx_mail_session_t *s, ngx_str_t *target, ngx_smtp_route_t *rt);
static ngx_int_t ngx_mail_smtp_ext_route_hold(ngx_mail_session_t *s,
    ngx_mail_smtp_ext_target_t *t);


static ngx_queue_t  ngx_mail_smtp_ext_targets;
static ngx_uint_t   ngx_mail_smtp_ext_ntargets;


ngx_int_t
ngx_mail_smtp_ext_route(ngx_mail_session_t *s, ngx_str_t *rcpt)
{
    u_char                        *at;
    ngx_str_t                      domain, rcpt_key, domain_key, vals[2];
    ngx_uint_t                     i, n;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;
    ngx_mail_smtp_ext_redis_cmd_t  cmds[2];
    const char                    *argv[4];
    size_t                         argvlen[4];

    u_char                         vbuf[2][NGX_MAIL_SMTP_EXT_CACHE_VALUE_MAX];

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

    /* keys and the query live in a pool of the lookup's own */

    if (ctx->route_pool) {
        ngx_destroy_pool(ctx->route_pool);
        ctx->route_pool = NULL;
    }

    if (ngx_mail_smtp_ext_lookup_cleanup_add(s) != NGX_OK) {
        return ngx_mail_smtp_ext_route_fail(s);
    }

    ctx->route_pool = ngx_create_pool(1024, c->log);
    if (ctx->route_pool == NULL) {
        return ngx_mail_smtp_ext_route_fail(s);
    }

    if (ngx_mail_smtp_ext_redis_key(ctx->route_pool, sscf->redis, "rcpt:",
                                    rcpt, 1, &rcpt_key)
        != NGX_OK)
    {
        return ngx_mail_smtp_ext_route_fail(s);
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

        if (ngx_mail_smtp_ext_redis_key(ctx->route_pool, sscf->redis,
                                        "domain:", &domain, 1, &domain_key)
            != NGX_OK)
        {
            return ngx_mail_smtp_ext_route_fail(s);
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

    ctx->route_keys[0] = rcpt_key;
    ctx->route_keys[1] = (n == 2) ? domain_key : rcpt_key;
    ctx->route_nkeys = n;

    /* answered from the cache when every key of the recipient is there */

    if (ngx_mail_smtp_ext_cache_enabled(s)) {
        for (i = 0; i < n; i++) {
            if (ngx_mail_smtp_ext_cache_get(s, &ctx->route_keys[i],
                                            vbuf[i], &vals[i], 0)
                != NGX_OK)
            {
                break;
            }
        }

        if (i == n) {
            ngx_mail_smtp_ext_metric_cache(NGX_SMTP_EXT_M_CACHE_HIT);

            ngx_destroy_pool(ctx->route_pool);
            ctx->route_pool = NULL;

            return ngx_mail_smtp_ext_route_decide(s, vals, n);
        }

        ngx_mail_smtp_ext_metric_cache(NGX_SMTP_EXT_M_CACHE_MISS);
    }

    if (ngx_mail_smtp_ext_redis_query(sscf->redis, ctx->route_pool, cmds, n,
                                      ngx_mail_smtp_ext_route_looked_up, s)
        != NGX_OK)
    {
        return ngx_mail_smtp_ext_route_stale(s);
    }

    ngx_mail_smtp_ext_wait_lookup(s);

    return NGX_AGAIN;
}


/*
 * Redis failed: a recipient all of whose keys are in the cache, within
 * "stale", is routed as then; otherwise the usual 451.
 */

static ngx_int_t
ngx_mail_smtp_ext_route_stale(ngx_mail_session_t *s)
{
    ngx_uint_t                i, n;
    ngx_str_t                 vals[2];
    ngx_mail_smtp_ext_ctx_t  *ctx;
    u_char                    vbuf[2][NGX_MAIL_SMTP_EXT_CACHE_VALUE_MAX];

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (ctx->route_pool == NULL || !ngx_mail_smtp_ext_cache_enabled(s)) {
        return ngx_mail_smtp_ext_route_fail(s);
    }

    n = ctx->route_nkeys;

    for (i = 0; i < n; i++) {
        if (ngx_mail_smtp_ext_cache_get(s, &ctx->route_keys[i], vbuf[i],
                                        &vals[i], 1)
            == NGX_DECLINED)
        {
            return ngx_mail_smtp_ext_route_fail(s);
        }
    }

    ngx_log_error(NGX_LOG_WARN, s->connection->log, 0,
                  "smtp_ext: Redis failed, recipient routed from the cache");

    ngx_mail_smtp_ext_metric_cache(NGX_SMTP_EXT_M_CACHE_STALE);

    ngx_destroy_pool(ctx->route_pool);
    ctx->route_pool = NULL;

    return ngx_mail_smtp_ext_route_decide(s, vals, n);
}


/*
 * The route of a recipient from the values of its keys (rcpt:, then
 * domain:; data NULL for a key Redis does not have): NGX_OK with
 * ctx->pending_route set, or NGX_DECLINED with a reply queued.
 */

static ngx_int_t
ngx_mail_smtp_ext_route_decide(ngx_mail_session_t *s, ngx_str_t *vals,
    ngx_uint_t n)
{
    ngx_uint_t                     i;
    ngx_smtp_route_t               rt;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    for (i = 0; i < n; i++) {

        if (vals[i].data == NULL) {
            continue;
        }

        if (i == 0
            && ngx_smtp_route_target(vals[i].data, vals[i].len, &rt)
               == NGX_SMTP_ROUTE_REJECT)
        {
            ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_rejected);
            return NGX_DECLINED;
        }

        return ngx_mail_smtp_ext_route_target(s, vals[i].data, vals[i].len);
    }

    /*
     * No route: only an authenticated client may relay; "<postmaster>"
     * must always be taken (RFC 5321 4.5.1).
     */

    if (sscf->pass && (s->login.len || n == 1)) {
        ctx->pending_route = sscf->pass;
        return NGX_OK;
    }

    ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_relay_denied);

    return NGX_DECLINED;
}


static ngx_int_t
ngx_mail_smtp_ext_route_fail(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (ctx->route_pool) {
        ngx_destroy_pool(ctx->route_pool);
        ctx->route_pool = NULL;
    }

    ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_lookup_failed);

    return NGX_DECLINED;
}


static void
ngx_mail_smtp_ext_route_looked_up(void *data, redisReply **replies,
    ngx_uint_t n)
{
    ngx_mail_session_t *s = data;

    ngx_int_t                 rc;
    redisReply               *r;
    ngx_str_t                 vals[2];
    ngx_uint_t                i;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (replies == NULL) {
        ngx_log_error(NGX_LOG_ERR, s->connection->log, 0,
                      "smtp_ext: Redis lookup for RCPT failed");

        rc = ngx_mail_smtp_ext_route_stale(s);
        goto done;
    }

    for (i = 0; i < n && i < 2; i++) {
        r = replies[i];

        if (r->type == REDIS_REPLY_NIL) {
            vals[i].data = NULL;
            vals[i].len = 0;
            continue;
        }

        if (r->type != REDIS_REPLY_STRING || r->len == 0) {
            ngx_log_error(NGX_LOG_ERR, s->connection->log, 0,
                          "smtp_ext: unexpected Redis reply type %d for "
                          "a route", r->type);

            rc = ngx_mail_smtp_ext_route_stale(s);
            goto done;
        }

        vals[i].data = (u_char *) r->str;
        vals[i].len = r->len;
    }

    /* the keys live in the lookup's pool: cache what Redis said first */

    if (ctx->route_pool && ngx_mail_smtp_ext_cache_enabled(s)) {
        for (i = 0; i < n && i < 2; i++) {
            ngx_mail_smtp_ext_cache_put(s, &ctx->route_keys[i], &vals[i]);
        }
    }

    /* the query is finished and the replies are not in the pool */

    if (ctx->route_pool) {
        ngx_destroy_pool(ctx->route_pool);
        ctx->route_pool = NULL;
    }

    rc = ngx_mail_smtp_ext_route_decide(s, vals, n);

done:

    if (rc == NGX_OK) {
        ngx_mail_smtp_ext_rcpt_routed(s);

    } else {
        ngx_mail_smtp_ext_lookup_done(s, NULL);
    }
}


/* NGX_OK with ctx->pending_route set, or NGX_DECLINED with a reply queued */

static ngx_int_t
ngx_mail_smtp_ext_route_target(ngx_mail_session_t *s, u_char *target,
    size_t len)
{
    ngx_int_t                       type;
    ngx_str_t                       name;
    ngx_uint_t                      i;
    ngx_smtp_route_t                rt;
    ngx_mail_smtp_ext_ctx_t        *ctx;
    ngx_mail_smtp_ext_pool_t      **pools;
    ngx_mail_smtp_ext_target_t     *t;
    ngx_mail_smtp_ext_main_conf_t  *smcf;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    smcf = ngx_mail_get_module_main_conf(s, ngx_mail_smtp_ext_module);

    name.data = target;
    name.len = len;

    type = ngx_smtp_route_target(target, len, &rt);

    if (type == NGX_SMTP_ROUTE_INVALID) {
        goto invalid;
    }

    /* configured pools first, "host:port" ones of smtp_ext_pass too */

    pools = smcf->pools.elts;

    for (i = 0; i < smcf->pools.nelts; i++) {
        if (pools[i]->name.len == len
            && ngx_strncmp(pools[i]->name.data, target, len) == 0)
        {
            ctx->pending_route = pools[i];
            return NGX_OK;
        }
    }

    if (type != NGX_SMTP_ROUTE_ADDR) {
        goto invalid;
    }

    t = ngx_mail_smtp_ext_runtime_pool(s, &name, &rt);

    if (t == NULL) {
        ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_bad_route);
        return NGX_DECLINED;
    }

    if (ngx_mail_smtp_ext_route_hold(s, t) != NGX_OK) {
        ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_lookup_failed);
        return NGX_DECLINED;
    }

    ctx->pending_route = &t->pool;

    return NGX_OK;

invalid:

    ngx_log_error(NGX_LOG_ERR, s->connection->log, 0,
                  "smtp_ext: invalid route \"%V\": not a pool name nor "
                  "an IP:port", &name);

    ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_bad_route);

    return NGX_DECLINED;
}


/*
 * "IP:port" from Redis: a one-server pool cached in the worker, so that
 * balancing state and backend reuse work as for configured pools, at most
 * NGX_MAIL_SMTP_EXT_MAX_TARGETS of them.
 */

static ngx_mail_smtp_ext_target_t *
ngx_mail_smtp_ext_runtime_pool(ngx_mail_session_t *s, ngx_str_t *target,
    ngx_smtp_route_t *rt)
{
    in_addr_t                    inaddr;
    ngx_queue_t                 *q;
    struct sockaddr_in          *sin;
    ngx_mail_smtp_ext_peer_t    *peer;
    ngx_mail_smtp_ext_target_t  *t, *victim;
#if (NGX_HAVE_INET6)
    struct sockaddr_in6         *sin6;
#endif

    if (ngx_mail_smtp_ext_targets.next == NULL) {
        ngx_queue_init(&ngx_mail_smtp_ext_targets);
    }

    for (q = ngx_queue_head(&ngx_mail_smtp_ext_targets);
         q != ngx_queue_sentinel(&ngx_mail_smtp_ext_targets);
         q = ngx_queue_next(q))
    {
        t = ngx_queue_data(q, ngx_mail_smtp_ext_target_t, queue);

        if (t->pool.name.len == target->len
            && ngx_strncmp(t->pool.name.data, target->data, target->len)
               == 0)
        {
            ngx_queue_remove(q);
            ngx_queue_insert_head(&ngx_mail_smtp_ext_targets, q);
            return t;
        }
    }

    if (target->len > NGX_SMTP_ROUTE_MAX) {
        return NULL;
    }

    victim = NULL;

    if (ngx_mail_smtp_ext_ntargets >= NGX_MAIL_SMTP_EXT_MAX_TARGETS) {

        /* the least recently used one that no session holds */

        for (q = ngx_queue_last(&ngx_mail_smtp_ext_targets);
             q != ngx_queue_sentinel(&ngx_mail_smtp_ext_targets);
             q = ngx_queue_prev(q))
        {
            t = ngx_queue_data(q, ngx_mail_smtp_ext_target_t, queue);

            if (t->refs == 0) {
                victim = t;
                break;
            }
        }

        if (victim == NULL) {
            ngx_log_error(NGX_LOG_ERR, s->connection->log, 0,
                          "smtp_ext: all %d IP:port routes are in use",
                          NGX_MAIL_SMTP_EXT_MAX_TARGETS);
            return NULL;
        }
    }

    t = ngx_calloc(sizeof(ngx_mail_smtp_ext_target_t), s->connection->log);
    if (t == NULL) {
        return NULL;
    }

    if (rt->ipv6) {
#if (NGX_HAVE_INET6)
        sin6 = &t->sockaddr.sockaddr_in6;

        if (ngx_inet6_addr(rt->host.data, rt->host.len,
                           sin6->sin6_addr.s6_addr)
            != NGX_OK)
        {
            ngx_free(t);
            return NULL;
        }

        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((in_port_t) rt->port);
        peer = &t->peer;
        peer->socklen = sizeof(struct sockaddr_in6);
#else
        ngx_free(t);
        return NULL;
#endif

    } else {
        inaddr = ngx_inet_addr(rt->host.data, rt->host.len);

        if (inaddr == INADDR_NONE) {
            ngx_free(t);
            return NULL;
        }

        sin = &t->sockaddr.sockaddr_in;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((in_port_t) rt->port);
        sin->sin_addr.s_addr = inaddr;
        peer = &t->peer;
        peer->socklen = sizeof(struct sockaddr_in);
    }

    if (victim) {
        ngx_queue_remove(&victim->queue);
        ngx_free(victim);
        ngx_mail_smtp_ext_ntargets--;
    }

    ngx_memcpy(t->name, target->data, target->len);

    t->pool.name.data = t->name;
    t->pool.name.len = target->len;
    t->pool.implicit = 1;

    /* a fixed one-element array: nothing is ever pushed to it */

    t->pool.peers.elts = peer;
    t->pool.peers.nelts = 1;
    t->pool.peers.size = sizeof(ngx_mail_smtp_ext_peer_t);
    t->pool.peers.nalloc = 1;
    t->pool.peers.pool = NULL;

    peer->sockaddr = &t->sockaddr.sockaddr;
    peer->name = t->pool.name;
    peer->server = t->pool.name;
    peer->weight = 1;
    peer->max_fails = 1;
    peer->fail_timeout = 10;
    ngx_mail_smtp_ext_pool_init_peer(peer);
    ngx_queue_init(&t->pool.cache);

    ngx_queue_insert_head(&ngx_mail_smtp_ext_targets, &t->queue);
    ngx_mail_smtp_ext_ntargets++;

    return t;
}


/*
 * A session holds the run-time routes it uses, at most
 * NGX_MAIL_SMTP_EXT_HOLDS at once.  When they are all taken, it lets go
 * of those it no longer needs: all but the transaction's route, and the
 * backend connection unless it is on that route.  A new target is never
 * the one the backend connection is on (the connection is on a held or a
 * configured pool), so the session would close it anyway.
 */

static ngx_int_t
ngx_mail_smtp_ext_route_hold(ngx_mail_session_t *s,
    ngx_mail_smtp_ext_target_t *t)
{
    ngx_uint_t                   i, n;
    ngx_mail_smtp_ext_ctx_t     *ctx;
    ngx_mail_smtp_ext_target_t  *h;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    for (i = 0; i < ctx->route_nholds; i++) {
        if (ctx->route_holds[i] == t) {
            return NGX_OK;
        }
    }

    if (ngx_mail_smtp_ext_lookup_cleanup_add(s) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ctx->route_nholds == NGX_MAIL_SMTP_EXT_HOLDS) {

        if (ctx->route == NULL
            || !ngx_mail_smtp_ext_relay_usable(s, ctx->route))
        {
            ngx_mail_smtp_ext_relay_close(s, 1);
        }

        n = 0;

        for (i = 0; i < ctx->route_nholds; i++) {
            h = ctx->route_holds[i];

            if (ctx->route == &h->pool) {
                ctx->route_holds[n++] = h;
                continue;
            }

            h->refs--;
        }

        ctx->route_nholds = n;
    }

    ctx->route_holds[ctx->route_nholds++] = t;
    t->refs++;

    return NGX_OK;
}


/* the session is over: its routes may go */

void
ngx_mail_smtp_ext_route_release(ngx_mail_session_t *s)
{
    ngx_uint_t                   i;
    ngx_mail_smtp_ext_ctx_t     *ctx;
    ngx_mail_smtp_ext_target_t  *h;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    for (i = 0; i < ctx->route_nholds; i++) {
        h = ctx->route_holds[i];
        h->refs--;
    }

    ctx->route_nholds = 0;
}
