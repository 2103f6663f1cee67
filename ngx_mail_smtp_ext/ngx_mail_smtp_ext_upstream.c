
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * Backend pools: the smtp_ext_upstream block, smtp_ext_pass targets, and
 * peer selection (smooth weighted round robin or least_conn, backup
 * servers, max_fails/fail_timeout, max_conns, health).  The peers' state
 * is per worker, or with "zone" in shared memory for the whole node,
 * kept across reloads while the pool's servers stay the same.
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
    time_t now, ngx_uint_t *busy);
static ngx_uint_t ngx_mail_smtp_ext_peer_usable(ngx_mail_smtp_ext_peer_t *peer,
    ngx_uint_t i, ngx_uint_t tried, ngx_uint_t backup, ngx_uint_t single,
    time_t now, ngx_uint_t *busy);
static char *ngx_mail_smtp_ext_upstream_zone(ngx_conf_t *cf,
    ngx_mail_smtp_ext_pool_t *pool);
static char *ngx_mail_smtp_ext_upstream_health(ngx_conf_t *cf,
    ngx_mail_smtp_ext_pool_t *pool);
static char *ngx_mail_smtp_ext_upstream_keepalive(ngx_conf_t *cf,
    ngx_mail_smtp_ext_pool_t *pool);
static ngx_int_t ngx_mail_smtp_ext_zone_init(ngx_shm_zone_t *shm_zone,
    void *data);
static uint32_t ngx_mail_smtp_ext_pool_signature(
    ngx_mail_smtp_ext_pool_t *pool);


#define NGX_MAIL_SMTP_EXT_ZONE_MAGIC  0x534d5458   /* "SMTX" */


/* the shared part of a pool with "zone" */
typedef struct {
    uint32_t                         magic;
    uint32_t                         signature;
    ngx_uint_t                       generation;
    ngx_uint_t                       npeers;
    ngx_mail_smtp_ext_peer_state_t   peers[1];
} ngx_mail_smtp_ext_zone_t;


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
    pool->hc_fails = 1;
    pool->hc_passes = 1;
    pool->hc_timeout = 5000;
    ngx_queue_init(&pool->cache);

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

    if (pool->hc_interval && pool->shm_zone == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"health_check\" in smtp_ext_upstream \"%V\" "
                           "needs a \"zone\"", &pool->name);
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

    if (ngx_strcmp(value[0].data, "zone") == 0) {
        return ngx_mail_smtp_ext_upstream_zone(cf, pool);
    }

    if (ngx_strcmp(value[0].data, "health_check") == 0) {
        return ngx_mail_smtp_ext_upstream_health(cf, pool);
    }

    if (ngx_strcmp(value[0].data, "keepalive") == 0) {
        return ngx_mail_smtp_ext_upstream_keepalive(cf, pool);
    }

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "unknown directive \"%V\" in smtp_ext_upstream, "
                       "expected \"server\", \"least_conn\", \"zone\", "
                       "\"health_check\" or \"keepalive\"", &value[0]);

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

        if (ngx_strncmp(value[i].data, "max_conns=", 10) == 0) {
            n = ngx_atoi(&value[i].data[10], value[i].len - 10);
            if (n == NGX_ERROR) {
                goto invalid;
            }

            proto.max_conns = n;
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
        peer->server = *addr;
        ngx_mail_smtp_ext_pool_init_peer(peer);

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
    ngx_queue_init(&pool->cache);

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


/* the state of a peer before it has done anything */

void
ngx_mail_smtp_ext_pool_init_peer(ngx_mail_smtp_ext_peer_t *peer)
{
    ngx_memzero(&peer->local, sizeof(ngx_mail_smtp_ext_peer_state_t));
    peer->local.effective_weight = peer->weight;
    peer->shared = NULL;
}


/*
 * Takes the zone's lock.  A worker of an older configuration whose pool
 * changed at a reload finds a newer generation there: the state its
 * peers point to was freed by the reload, so it goes on with a state of
 * its own and never touches the zone again.
 */

void
ngx_mail_smtp_ext_pool_lock(ngx_mail_smtp_ext_pool_t *pool)
{
    ngx_uint_t                 i;
    ngx_mail_smtp_ext_zone_t  *zone;
    ngx_mail_smtp_ext_peer_t  *peers;

    if (pool->shpool == NULL) {
        return;
    }

    ngx_shmtx_lock(&pool->shpool->mutex);

    zone = pool->shpool->data;

    if (zone && zone->generation == pool->generation) {
        return;
    }

    ngx_shmtx_unlock(&pool->shpool->mutex);

    ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
                  "smtp_ext_upstream \"%V\" changed at a reload: this "
                  "worker balances on its own until it exits", &pool->name);

    peers = pool->peers.elts;

    for (i = 0; i < pool->peers.nelts; i++) {
        peers[i].shared = NULL;
    }

    pool->shpool = NULL;
}


/*
 * A new worker in a process slot: connections counted for the slot's
 * earlier owner, a worker that was killed, are given back.
 */

void
ngx_mail_smtp_ext_upstream_init_process(ngx_mail_smtp_ext_main_conf_t *smcf)
{
    ngx_uint_t                        i, j;
    ngx_mail_smtp_ext_pool_t        **pools;
    ngx_mail_smtp_ext_peer_t         *peers;
    ngx_mail_smtp_ext_peer_state_t   *st;

    if (ngx_process_slot < 0
        || ngx_process_slot >= NGX_MAIL_SMTP_EXT_WSLOTS)
    {
        return;
    }

    pools = smcf->pools.elts;

    for (i = 0; i < smcf->pools.nelts; i++) {

        if (pools[i]->shpool == NULL) {
            continue;
        }

        ngx_mail_smtp_ext_pool_lock(pools[i]);

        peers = pools[i]->peers.elts;

        for (j = 0; j < pools[i]->peers.nelts && peers[j].shared; j++) {
            st = peers[j].shared;

            if (st->wconns[ngx_process_slot]) {
                st->conns -= ngx_min(st->conns,
                                     st->wconns[ngx_process_slot]);
                st->wconns[ngx_process_slot] = 0;
            }
        }

        ngx_mail_smtp_ext_pool_unlock(pools[i]);
    }
}


void
ngx_mail_smtp_ext_pool_unlock(ngx_mail_smtp_ext_pool_t *pool)
{
    if (pool->shpool) {
        ngx_shmtx_unlock(&pool->shpool->mutex);
    }
}


/*
 * A peer for a new connection, counted in its connections, or NULL;
 * *busy is set when a peer was skipped only for its max_conns.
 */

ngx_mail_smtp_ext_peer_t *
ngx_mail_smtp_ext_get_peer(ngx_mail_smtp_ext_pool_t *pool, ngx_uint_t tried,
    ngx_uint_t *busy)
{
    time_t                           now;
    ngx_mail_smtp_ext_peer_t        *peer;
    ngx_mail_smtp_ext_peer_state_t  *st;

    now = ngx_time();
    *busy = 0;

    ngx_mail_smtp_ext_pool_lock(pool);

    peer = ngx_mail_smtp_ext_pick(pool, tried, 0, now, busy);

    if (peer == NULL && pool->backups) {
        peer = ngx_mail_smtp_ext_pick(pool, tried, 1, now, busy);
    }

    if (peer) {
        st = ngx_mail_smtp_ext_peer_state(peer);
        st->conns++;

        if (peer->shared && ngx_process_slot >= 0
            && ngx_process_slot < NGX_MAIL_SMTP_EXT_WSLOTS)
        {
            st->wconns[ngx_process_slot]++;
        }

        (void) ngx_atomic_fetch_add(&st->selected, 1);
    }

    ngx_mail_smtp_ext_pool_unlock(pool);

    return peer;
}


static ngx_mail_smtp_ext_peer_t *
ngx_mail_smtp_ext_pick(ngx_mail_smtp_ext_pool_t *pool, ngx_uint_t tried,
    ngx_uint_t backup, time_t now, ngx_uint_t *busy)
{
    ngx_int_t                        total;
    ngx_uint_t                       i, single;
    ngx_mail_smtp_ext_peer_t        *peers, *peer, *best, *fewest;
    ngx_mail_smtp_ext_peer_state_t  *st, *bst, *fst;

    peers = pool->peers.elts;
    single = (pool->peers.nelts == 1);

    /* least_conn: first find the lowest conns/weight, then balance ties */

    fewest = NULL;
    fst = NULL;

    for (i = 0; i < pool->peers.nelts; i++) {
        peer = &peers[i];

        if (!ngx_mail_smtp_ext_peer_usable(peer, i, tried, backup, single,
                                           now, busy))
        {
            continue;
        }

        st = ngx_mail_smtp_ext_peer_state(peer);

        if (pool->least_conn
            && (fewest == NULL
                || st->conns * fewest->weight < fst->conns * peer->weight))
        {
            fewest = peer;
            fst = st;
        }
    }

    best = NULL;
    bst = NULL;
    total = 0;

    for (i = 0; i < pool->peers.nelts; i++) {
        peer = &peers[i];

        if (!ngx_mail_smtp_ext_peer_usable(peer, i, tried, backup, single,
                                           now, busy))
        {
            continue;
        }

        st = ngx_mail_smtp_ext_peer_state(peer);

        if (fewest
            && st->conns * fewest->weight != fst->conns * peer->weight)
        {
            continue;
        }

        st->current_weight += st->effective_weight;
        total += st->effective_weight;

        if (st->effective_weight < (ngx_int_t) peer->weight) {
            st->effective_weight++;
        }

        if (best == NULL || st->current_weight > bst->current_weight) {
            best = peer;
            bst = st;
        }
    }

    if (best == NULL) {
        return NULL;
    }

    bst->current_weight -= total;

    if (now - bst->checked > best->fail_timeout) {
        bst->checked = now;
    }

    return best;
}


/*
 * Peer i may take this connect: of the tier asked for, not down, not
 * tried yet, healthy, below max_conns, and not failed max_fails times
 * within fail_timeout (a single peer is always tried for failures, as
 * nginx's upstream does, but not when unhealthy or busy).
 */

static ngx_uint_t
ngx_mail_smtp_ext_peer_usable(ngx_mail_smtp_ext_peer_t *peer, ngx_uint_t i,
    ngx_uint_t tried, ngx_uint_t backup, ngx_uint_t single, time_t now,
    ngx_uint_t *busy)
{
    ngx_mail_smtp_ext_peer_state_t  *st;

    if (peer->backup != backup
        || peer->down
        || (tried & ((ngx_uint_t) 1 << i)))
    {
        return 0;
    }

    st = ngx_mail_smtp_ext_peer_state(peer);

    if (st->unhealthy) {
        return 0;
    }

    if (!single
        && peer->max_fails
        && st->fails >= peer->max_fails
        && now - st->checked <= peer->fail_timeout)
    {
        return 0;
    }

    if (peer->max_conns && st->conns >= peer->max_conns) {
        *busy = 1;
        return 0;
    }

    return 1;
}


void
ngx_mail_smtp_ext_peer_done(ngx_mail_smtp_ext_pool_t *pool,
    ngx_mail_smtp_ext_peer_t *peer, ngx_uint_t failed)
{
    ngx_mail_smtp_ext_peer_state_t  *st;

    ngx_mail_smtp_ext_pool_lock(pool);

    st = ngx_mail_smtp_ext_peer_state(peer);

    if (st->conns) {
        st->conns--;
    }

    if (peer->shared && ngx_process_slot >= 0
        && ngx_process_slot < NGX_MAIL_SMTP_EXT_WSLOTS
        && st->wconns[ngx_process_slot])
    {
        st->wconns[ngx_process_slot]--;
    }

    /*
     * A normal close says nothing of the peer's health now: only a
     * successful handshake forgets its failures.
     */

    if (failed) {
        st->fails++;
        st->checked = ngx_time();
        (void) ngx_atomic_fetch_add(&st->failures, 1);

        if (peer->max_fails) {
            st->effective_weight -= peer->weight / peer->max_fails;
        }

        if (st->effective_weight < 0) {
            st->effective_weight = 0;
        }
    }

    ngx_mail_smtp_ext_pool_unlock(pool);
}


void
ngx_mail_smtp_ext_peer_ready(ngx_mail_smtp_ext_pool_t *pool,
    ngx_mail_smtp_ext_peer_t *peer)
{
    ngx_mail_smtp_ext_peer_state_t  *st;

    ngx_mail_smtp_ext_pool_lock(pool);
    st = ngx_mail_smtp_ext_peer_state(peer);
    st->fails = 0;
    ngx_mail_smtp_ext_pool_unlock(pool);
}


ngx_uint_t
ngx_mail_smtp_ext_peer_index(ngx_mail_smtp_ext_pool_t *pool,
    ngx_mail_smtp_ext_peer_t *peer)
{
    return peer - (ngx_mail_smtp_ext_peer_t *) pool->peers.elts;
}


/* zone NAME [SIZE] */

static char *
ngx_mail_smtp_ext_upstream_zone(ngx_conf_t *cf,
    ngx_mail_smtp_ext_pool_t *pool)
{
    ssize_t     size;
    ngx_str_t  *value;

    value = cf->args->elts;

    if (pool->shm_zone) {
        return "is duplicate";
    }

    if (cf->args->nelts < 2 || cf->args->nelts > 3 || value[1].len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid \"zone\" in smtp_ext_upstream \"%V\", "
                           "expected \"zone NAME [SIZE]\"", &pool->name);
        return NGX_CONF_ERROR;
    }

    size = 65536;

    if (cf->args->nelts == 3) {
        size = ngx_parse_size(&value[2]);

        if (size == NGX_ERROR || size < (ssize_t) (8 * ngx_pagesize)) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "zone \"%V\" is too small, at least %uzk",
                               &value[1], 8 * ngx_pagesize / 1024);
            return NGX_CONF_ERROR;
        }
    }

    pool->shm_zone = ngx_shared_memory_add(cf, &value[1], size,
                                           &ngx_mail_smtp_ext_module);
    if (pool->shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (pool->shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "zone \"%V\" is used by another "
                           "smtp_ext_upstream", &value[1]);
        return NGX_CONF_ERROR;
    }

    pool->shm_zone->init = ngx_mail_smtp_ext_zone_init;
    pool->shm_zone->data = pool;

    return NGX_CONF_OK;
}


/*
 * Runs in the master at start and reload.  A zone that survives a reload
 * keeps its peers' state when the pool's servers are the same.
 */

static ngx_int_t
ngx_mail_smtp_ext_zone_init(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_mail_smtp_ext_pool_t *pool = shm_zone->data;

    size_t                            len;
    uint32_t                          signature;
    ngx_uint_t                        i, generation;
    ngx_slab_pool_t                  *shpool;
    ngx_mail_smtp_ext_zone_t         *zone;
    ngx_mail_smtp_ext_peer_t         *peers;
    ngx_mail_smtp_ext_peer_state_t   *st;

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;
    pool->shpool = shpool;

    peers = pool->peers.elts;
    signature = ngx_mail_smtp_ext_pool_signature(pool);

    zone = data ? shpool->data : NULL;

    if (zone
        && zone->magic == NGX_MAIL_SMTP_EXT_ZONE_MAGIC
        && zone->signature == signature
        && zone->npeers == pool->peers.nelts)
    {
        pool->generation = zone->generation;

        for (i = 0; i < pool->peers.nelts; i++) {
            peers[i].shared = &zone->peers[i];

            if (pool->hc_mandatory && pool->hc_interval) {
                /* until the first good check of the new configuration */
                zone->peers[i].unhealthy = 1;
                zone->peers[i].hc_passes = 0;
                zone->peers[i].hc_fails = 0;
            }
        }

        return NGX_OK;
    }

    /* a new generation: old workers see it and leave the zone alone */

    generation = (zone && zone->magic == NGX_MAIL_SMTP_EXT_ZONE_MAGIC)
                 ? zone->generation + 1 : 1;

    if (zone) {
        ngx_slab_free(shpool, zone);
    }

    len = sizeof(ngx_mail_smtp_ext_zone_t)
          + (pool->peers.nelts - 1) * sizeof(ngx_mail_smtp_ext_peer_state_t);

    zone = ngx_slab_calloc(shpool, len);
    if (zone == NULL) {
        ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                      "zone \"%V\" of smtp_ext_upstream \"%V\" is too small",
                      &shm_zone->shm.name, &pool->name);
        return NGX_ERROR;
    }

    zone->magic = NGX_MAIL_SMTP_EXT_ZONE_MAGIC;
    zone->signature = signature;
    zone->generation = generation;
    zone->npeers = pool->peers.nelts;
    pool->generation = generation;

    for (i = 0; i < pool->peers.nelts; i++) {
        st = &zone->peers[i];
        st->effective_weight = peers[i].weight;
        st->unhealthy = (pool->hc_mandatory && pool->hc_interval);
        peers[i].shared = st;
    }

    shpool->data = zone;

    return NGX_OK;
}


/* what makes a pool "the same" across a reload */

static uint32_t
ngx_mail_smtp_ext_pool_signature(ngx_mail_smtp_ext_pool_t *pool)
{
    uint32_t                   crc;
    ngx_uint_t                 i;
    ngx_mail_smtp_ext_peer_t  *peers;

    peers = pool->peers.elts;

    ngx_crc32_init(crc);

    for (i = 0; i < pool->peers.nelts; i++) {
        ngx_crc32_update(&crc, peers[i].name.data, peers[i].name.len);
        ngx_crc32_update(&crc, (u_char *) &peers[i].weight,
                         sizeof(ngx_uint_t));
        ngx_crc32_update(&crc, (u_char *) &peers[i].max_fails,
                         sizeof(ngx_uint_t));
        ngx_crc32_update(&crc, (u_char *) &peers[i].fail_timeout,
                         sizeof(time_t));
        ngx_crc32_update(&crc, (u_char *) (peers[i].backup ? "b" : "p"), 1);
        ngx_crc32_update(&crc, (u_char *) (peers[i].down ? "d" : "u"), 1);
    }

    ngx_crc32_final(crc);

    return crc;
}


/*
 * health_check [interval=T] [fails=N] [passes=N] [timeout=T] [jitter=T]
 *     [mandatory] [ehlo=NAME]
 */

static char *
ngx_mail_smtp_ext_upstream_health(ngx_conf_t *cf,
    ngx_mail_smtp_ext_pool_t *pool)
{
    ngx_int_t    n;
    ngx_str_t   *value, s;
    ngx_msec_t   t, *tp;
    ngx_uint_t   i;

    if (pool->hc_interval) {
        return "is duplicate";
    }

    value = cf->args->elts;

    pool->hc_interval = 5000;

    for (i = 1; i < cf->args->nelts; i++) {

        tp = NULL;

        if (ngx_strncmp(value[i].data, "interval=", 9) == 0) {
            tp = &pool->hc_interval;
            s.data = value[i].data + 9;
            s.len = value[i].len - 9;

        } else if (ngx_strncmp(value[i].data, "timeout=", 8) == 0) {
            tp = &pool->hc_timeout;
            s.data = value[i].data + 8;
            s.len = value[i].len - 8;

        } else if (ngx_strncmp(value[i].data, "jitter=", 7) == 0) {
            tp = &pool->hc_jitter;
            s.data = value[i].data + 7;
            s.len = value[i].len - 7;
        }

        if (tp) {
            t = ngx_parse_time(&s, 0);
            if (t == (ngx_msec_t) NGX_ERROR
                || (t == 0 && tp != &pool->hc_jitter))
            {
                goto invalid;
            }

            *tp = t;
            continue;
        }

        if (ngx_strncmp(value[i].data, "fails=", 6) == 0) {
            n = ngx_atoi(value[i].data + 6, value[i].len - 6);
            if (n == NGX_ERROR || n == 0) {
                goto invalid;
            }

            pool->hc_fails = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "passes=", 7) == 0) {
            n = ngx_atoi(value[i].data + 7, value[i].len - 7);
            if (n == NGX_ERROR || n == 0) {
                goto invalid;
            }

            pool->hc_passes = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "ehlo=", 5) == 0
            && value[i].len > 5)
        {
            pool->hc_ehlo.data = value[i].data + 5;
            pool->hc_ehlo.len = value[i].len - 5;
            continue;
        }

        if (ngx_strcmp(value[i].data, "mandatory") == 0) {
            pool->hc_mandatory = 1;
            continue;
        }

        goto invalid;
    }

    if (pool->hc_ehlo.len == 0) {
        pool->hc_ehlo = cf->cycle->hostname;
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid health_check parameter \"%V\"", &value[i]);

    return NGX_CONF_ERROR;
}


/* keepalive N [timeout=T] */

static char *
ngx_mail_smtp_ext_upstream_keepalive(ngx_conf_t *cf,
    ngx_mail_smtp_ext_pool_t *pool)
{
    ngx_int_t   n;
    ngx_str_t  *value, s;

    if (pool->keepalive) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (cf->args->nelts < 2 || cf->args->nelts > 3) {
        goto invalid;
    }

    n = ngx_atoi(value[1].data, value[1].len);
    if (n == NGX_ERROR || n == 0) {
        goto invalid;
    }

    pool->keepalive = n;
    pool->keepalive_timeout = 60000;

    if (cf->args->nelts == 3) {
        if (ngx_strncmp(value[2].data, "timeout=", 8) != 0) {
            goto invalid;
        }

        s.data = value[2].data + 8;
        s.len = value[2].len - 8;

        pool->keepalive_timeout = ngx_parse_time(&s, 0);
        if (pool->keepalive_timeout == (ngx_msec_t) NGX_ERROR
            || pool->keepalive_timeout == 0)
        {
            goto invalid;
        }
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid \"keepalive\" in smtp_ext_upstream \"%V\", "
                       "expected \"keepalive N [timeout=T]\"", &pool->name);

    return NGX_CONF_ERROR;
}
