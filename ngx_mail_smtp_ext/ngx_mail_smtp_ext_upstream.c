
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * Backend pools: the smtp_ext_upstream block, smtp_ext_pass targets, and
 * peer selection (smooth weighted round robin or least_conn, backup
 * servers, max_fails/fail_timeout).  Balancing state is per worker.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_mail.h>

#include "ngx_mail_smtp_ext_module.h"


/* a pool's peers are tracked in a bit mask while one connect is tried */
#define NGX_MAIL_SMTP_EXT_MAX_PEERS  (8 * sizeof(ngx_uint_t))


static char *ngx_mail_smtp_ext_upstream(ngx_conf_t *cf, ngx_command_t *dummy,
    void *conf);
static char *ngx_mail_smtp_ext_upstream_server(ngx_conf_t *cf,
    ngx_mail_smtp_ext_pool_t *pool);
static ngx_int_t ngx_mail_smtp_ext_add_peers(ngx_conf_t *cf,
    ngx_mail_smtp_ext_pool_t *pool, ngx_str_t *addr,
    ngx_mail_smtp_ext_peer_t *proto);
static ngx_mail_smtp_ext_peer_t *ngx_mail_smtp_ext_pick(
    ngx_mail_smtp_ext_pool_t *pool, ngx_uint_t tried, ngx_uint_t backup,
    time_t now);
static ngx_uint_t ngx_mail_smtp_ext_peer_usable(ngx_mail_smtp_ext_peer_t *peer,
    ngx_uint_t i, ngx_uint_t tried, ngx_uint_t backup, ngx_uint_t single,
    time_t now);


char *
ngx_mail_smtp_ext_upstream_block(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_mail_smtp_ext_main_conf_t *smcf = conf;

    char                       *rv;
    ngx_str_t                  *value;
    ngx_uint_t                  i;
    ngx_conf_t                  save;
    ngx_mail_smtp_ext_pool_t   *pool, **pp;

    value = cf->args->elts;

    pp = smcf->pools.elts;
    for (i = 0; i < smcf->pools.nelts; i++) {
        if (!pp[i]->implicit
            && pp[i]->name.len == value[1].len
            && ngx_strncmp(pp[i]->name.data, value[1].data, value[1].len)
               == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "duplicate smtp_ext_upstream \"%V\"",
                               &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    pool = ngx_pcalloc(cf->pool, sizeof(ngx_mail_smtp_ext_pool_t));
    if (pool == NULL) {
        return NGX_CONF_ERROR;
    }

    pool->name = value[1];
    pool->file_name = cf->conf_file->file.name.data;
    pool->line = cf->conf_file->line;

    if (ngx_array_init(&pool->peers, cf->pool, 4,
                       sizeof(ngx_mail_smtp_ext_peer_t))
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    pp = ngx_array_push(&smcf->pools);
    if (pp == NULL) {
        return NGX_CONF_ERROR;
    }

    *pp = pool;

    save = *cf;
    cf->handler = ngx_mail_smtp_ext_upstream;
    cf->handler_conf = (void *) pool;

    rv = ngx_conf_parse(cf, NULL);

    *cf = save;

    if (rv != NGX_CONF_OK) {
        return rv;
    }

    if (pool->peers.nelts == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "no servers are inside smtp_ext_upstream \"%V\"",
                           &pool->name);
        return NGX_CONF_ERROR;
    }

    if (pool->peers.nelts == pool->backups) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "smtp_ext_upstream \"%V\" has only backup "
                           "servers", &pool->name);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_mail_smtp_ext_upstream(ngx_conf_t *cf, ngx_command_t *dummy, void *conf)
{
    ngx_mail_smtp_ext_pool_t  *pool = conf;

    ngx_str_t  *value;

    value = cf->args->elts;

    if (cf->args->nelts == 1 && ngx_strcmp(value[0].data, "least_conn") == 0)
    {
        pool->least_conn = 1;
        return NGX_CONF_OK;
    }

    if (cf->args->nelts >= 2 && ngx_strcmp(value[0].data, "server") == 0) {
        return ngx_mail_smtp_ext_upstream_server(cf, pool);
    }

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "unknown directive \"%V\" in smtp_ext_upstream, "
                       "expected \"server\" or \"least_conn\"", &value[0]);

    return NGX_CONF_ERROR;
}


static char *
ngx_mail_smtp_ext_upstream_server(ngx_conf_t *cf,
    ngx_mail_smtp_ext_pool_t *pool)
{
    time_t                     fail_timeout;
    ngx_int_t                  n;
    ngx_str_t                 *value, s;
    ngx_uint_t                 i;
    ngx_mail_smtp_ext_peer_t   proto;

    value = cf->args->elts;

    ngx_memzero(&proto, sizeof(ngx_mail_smtp_ext_peer_t));
    proto.weight = 1;
    proto.max_fails = 1;
    proto.fail_timeout = 10;

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "weight=", 7) == 0) {
            n = ngx_atoi(&value[i].data[7], value[i].len - 7);
            if (n == NGX_ERROR || n == 0) {
                goto invalid;
            }

            proto.weight = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "max_fails=", 10) == 0) {
            n = ngx_atoi(&value[i].data[10], value[i].len - 10);
            if (n == NGX_ERROR) {
                goto invalid;
            }

            proto.max_fails = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "fail_timeout=", 13) == 0) {
            s.len = value[i].len - 13;
            s.data = &value[i].data[13];

            fail_timeout = ngx_parse_time(&s, 1);
            if (fail_timeout == (time_t) NGX_ERROR) {
                goto invalid;
            }

            proto.fail_timeout = fail_timeout;
            continue;
        }

        if (ngx_strcmp(value[i].data, "backup") == 0) {
            proto.backup = 1;
            continue;
        }

        if (ngx_strcmp(value[i].data, "down") == 0) {
            proto.down = 1;
            continue;
        }

        goto invalid;
    }

    if (ngx_mail_smtp_ext_add_peers(cf, pool, &value[1], &proto) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);

    return NGX_CONF_ERROR;
}


static ngx_int_t
ngx_mail_smtp_ext_add_peers(ngx_conf_t *cf, ngx_mail_smtp_ext_pool_t *pool,
    ngx_str_t *addr, ngx_mail_smtp_ext_peer_t *proto)
{
    ngx_url_t                  u;
    ngx_uint_t                 i;
    ngx_mail_smtp_ext_peer_t  *peer;

    ngx_memzero(&u, sizeof(ngx_url_t));

    u.url = *addr;
    u.default_port = 25;

    /* names are resolved here, once: nothing is looked up at run time */

    if (ngx_parse_url(cf->pool, &u) != NGX_OK) {
        if (u.err) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "%s in backend \"%V\"", u.err, addr);
        }

        return NGX_ERROR;
    }

    if (pool->peers.nelts + u.naddrs > NGX_MAIL_SMTP_EXT_MAX_PEERS) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "too many servers in smtp_ext_upstream \"%V\", "
                           "at most %uz", &pool->name,
                           NGX_MAIL_SMTP_EXT_MAX_PEERS);
        return NGX_ERROR;
    }

    for (i = 0; i < u.naddrs; i++) {
        peer = ngx_array_push(&pool->peers);
        if (peer == NULL) {
            return NGX_ERROR;
        }

        *peer = *proto;
        peer->sockaddr = u.addrs[i].sockaddr;
        peer->socklen = u.addrs[i].socklen;
        peer->name = u.addrs[i].name;
        peer->effective_weight = peer->weight;

        if (peer->backup) {
            pool->backups++;
        }
    }

    return NGX_OK;
}


ngx_mail_smtp_ext_pool_t *
ngx_mail_smtp_ext_find_pool(ngx_conf_t *cf,
    ngx_mail_smtp_ext_main_conf_t *smcf, ngx_str_t *target)
{
    ngx_uint_t                 i;
    ngx_mail_smtp_ext_peer_t   proto;
    ngx_mail_smtp_ext_pool_t  *pool, **pp;

    pp = smcf->pools.elts;

    for (i = 0; i < smcf->pools.nelts; i++) {
        if (pp[i]->name.len == target->len
            && ngx_strncmp(pp[i]->name.data, target->data, target->len) == 0)
        {
            return pp[i];
        }
    }

    if (ngx_strlchr(target->data, target->data + target->len, ':') == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "unknown smtp_ext_upstream \"%V\" (a target is a "
                      "pool name or host:port)", target);
        return NULL;
    }

    /* "host:port": a pool of its own, shared by the servers naming it */

    pool = ngx_pcalloc(cf->pool, sizeof(ngx_mail_smtp_ext_pool_t));
    if (pool == NULL) {
        return NULL;
    }

    pool->name = *target;
    pool->implicit = 1;

    if (ngx_array_init(&pool->peers, cf->pool, 1,
                       sizeof(ngx_mail_smtp_ext_peer_t))
        != NGX_OK)
    {
        return NULL;
    }

    ngx_memzero(&proto, sizeof(ngx_mail_smtp_ext_peer_t));
    proto.weight = 1;
    proto.max_fails = 1;
    proto.fail_timeout = 10;

    if (ngx_mail_smtp_ext_add_peers(cf, pool, target, &proto) != NGX_OK) {
        return NULL;
    }

    pp = ngx_array_push(&smcf->pools);
    if (pp == NULL) {
        return NULL;
    }

    *pp = pool;

    return pool;
}


ngx_mail_smtp_ext_peer_t *
ngx_mail_smtp_ext_get_peer(ngx_mail_smtp_ext_pool_t *pool, ngx_uint_t tried)
{
    time_t                     now;
    ngx_mail_smtp_ext_peer_t  *peer;

    now = ngx_time();

    peer = ngx_mail_smtp_ext_pick(pool, tried, 0, now);

    if (peer == NULL && pool->backups) {
        peer = ngx_mail_smtp_ext_pick(pool, tried, 1, now);
    }

    if (peer) {
        peer->conns++;
    }

    return peer;
}


static ngx_mail_smtp_ext_peer_t *
ngx_mail_smtp_ext_pick(ngx_mail_smtp_ext_pool_t *pool, ngx_uint_t tried,
    ngx_uint_t backup, time_t now)
{
    ngx_int_t                  total;
    ngx_uint_t                 i, single;
    ngx_mail_smtp_ext_peer_t  *peers, *peer, *best, *fewest;

    peers = pool->peers.elts;
    single = (pool->peers.nelts == 1);

    /* least_conn: first find the lowest conns/weight, then balance ties */

    fewest = NULL;

    for (i = 0; i < pool->peers.nelts; i++) {
        peer = &peers[i];

        if (!ngx_mail_smtp_ext_peer_usable(peer, i, tried, backup, single,
                                           now))
        {
            continue;
        }

        if (pool->least_conn
            && (fewest == NULL
                || peer->conns * fewest->weight
                   < fewest->conns * peer->weight))
        {
            fewest = peer;
        }
    }

    best = NULL;
    total = 0;

    for (i = 0; i < pool->peers.nelts; i++) {
        peer = &peers[i];

        if (!ngx_mail_smtp_ext_peer_usable(peer, i, tried, backup, single,
                                           now))
        {
            continue;
        }

        if (fewest
            && peer->conns * fewest->weight != fewest->conns * peer->weight)
        {
            continue;
        }

        peer->current_weight += peer->effective_weight;
        total += peer->effective_weight;

        if (peer->effective_weight < (ngx_int_t) peer->weight) {
            peer->effective_weight++;
        }

        if (best == NULL || peer->current_weight > best->current_weight) {
            best = peer;
        }
    }

    if (best == NULL) {
        return NULL;
    }

    best->current_weight -= total;

    if (now - best->checked > best->fail_timeout) {
        best->checked = now;
    }

    return best;
}


/*
 * Peer i may take this connect: of the tier asked for, not down, not
 * tried yet, and not failed max_fails times within fail_timeout (a single
 * peer is always tried, as nginx's upstream does).
 */

static ngx_uint_t
ngx_mail_smtp_ext_peer_usable(ngx_mail_smtp_ext_peer_t *peer, ngx_uint_t i,
    ngx_uint_t tried, ngx_uint_t backup, ngx_uint_t single, time_t now)
{
    if (peer->backup != backup
        || peer->down
        || (tried & ((ngx_uint_t) 1 << i)))
    {
        return 0;
    }

    if (!single
        && peer->max_fails
        && peer->fails >= peer->max_fails
        && now - peer->checked <= peer->fail_timeout)
    {
        return 0;
    }

    return 1;
}


void
ngx_mail_smtp_ext_peer_done(ngx_mail_smtp_ext_peer_t *peer,
    ngx_uint_t failed)
{
    if (peer->conns) {
        peer->conns--;
    }

    if (failed) {
        peer->fails++;
        peer->checked = ngx_time();

        if (peer->max_fails) {
            peer->effective_weight -= peer->weight / peer->max_fails;
        }

        if (peer->effective_weight < 0) {
            peer->effective_weight = 0;
        }
    }

    /*
     * A normal close says nothing of the peer's health now: only a
     * successful handshake (the relay's "ready") forgets its failures.
     */
}


ngx_uint_t
ngx_mail_smtp_ext_peer_index(ngx_mail_smtp_ext_pool_t *pool,
    ngx_mail_smtp_ext_peer_t *peer)
{
    return peer - (ngx_mail_smtp_ext_peer_t *) pool->peers.elts;
}
