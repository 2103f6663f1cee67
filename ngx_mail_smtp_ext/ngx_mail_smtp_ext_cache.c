
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * smtp_ext_redis_cache SIZE [valid=T] [stale=T] (SPEC 11): a per-node
 * cache in shared memory of what Redis answered for routing keys, absence
 * included.  A result younger than "valid" is used without asking Redis;
 * one younger than valid + stale is used when Redis fails or times out.
 * Entries are kept in an rbtree by the key's crc32 and in an LRU queue;
 * when the zone is full the least recently used go.  A reload empties it.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>

#include "ngx_mail_smtp_ext_module.h"
#include "ngx_mail_smtp_ext_cache.h"


typedef struct {
    ngx_rbtree_t                      rbtree;
    ngx_rbtree_node_t                 sentinel;
    ngx_queue_t                       lru;
    ngx_uint_t                        generation; /* reloads seen */
} ngx_mail_smtp_ext_cache_sh_t;


typedef struct {
    ngx_shm_zone_t                   *shm_zone;
    ngx_slab_pool_t                  *shpool;
    ngx_mail_smtp_ext_cache_sh_t     *sh;
    ngx_uint_t                        generation; /* sh's at this cycle */
    ngx_msec_t                        valid;
    ngx_msec_t                        stale;
    unsigned                          reloaded:1; /* not emptied yet */
} ngx_mail_smtp_ext_cache_t;


typedef struct {
    ngx_rbtree_node_t                 node;       /* key: crc32 */
    ngx_queue_t                       queue;
    ngx_msec_t                        stored;
    u_short                           klen;
    u_short                           vlen;
    u_char                            absent;
    u_char                            data[1];    /* key, then value */
} ngx_mail_smtp_ext_cache_node_t;


static ngx_int_t ngx_mail_smtp_ext_cache_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static void ngx_mail_smtp_ext_cache_insert(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel);
static ngx_mail_smtp_ext_cache_node_t *ngx_mail_smtp_ext_cache_find(
    ngx_mail_smtp_ext_cache_t *cache, ngx_str_t *key, uint32_t hash);


char *
ngx_mail_smtp_ext_cache_conf(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_mail_smtp_ext_main_conf_t *smcf = conf;

    ssize_t                     size;
    ngx_str_t                  *value, s, name;
    ngx_msec_t                  t;
    ngx_uint_t                  i;
    ngx_mail_smtp_ext_cache_t  *cache;

    value = cf->args->elts;

    if (smcf->cache) {
        return "is duplicate";
    }

    cache = ngx_pcalloc(cf->pool, sizeof(ngx_mail_smtp_ext_cache_t));
    if (cache == NULL) {
        return NGX_CONF_ERROR;
    }

    size = ngx_parse_size(&value[1]);

    if (size == NGX_ERROR || size < (ssize_t) (8 * ngx_pagesize)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid smtp_ext_redis_cache size \"%V\", "
                           "at least %uzk", &value[1],
                           8 * ngx_pagesize / 1024);
        return NGX_CONF_ERROR;
    }

    cache->valid = 10000;
    cache->stale = 0;

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "valid=", 6) == 0) {
            s.data = value[i].data + 6;
            s.len = value[i].len - 6;

        } else if (ngx_strncmp(value[i].data, "stale=", 6) == 0) {
            s.data = value[i].data + 6;
            s.len = value[i].len - 6;

        } else {
            goto invalid;
        }

        t = ngx_parse_time(&s, 0);
        if (t == (ngx_msec_t) NGX_ERROR) {
            goto invalid;
        }

        if (value[i].data[0] == 'v') {
            cache->valid = t;

        } else {
            cache->stale = t;
        }
    }

    ngx_str_set(&name, "smtp_ext_redis_cache");

    cache->shm_zone = ngx_shared_memory_add(cf, &name, size,
                                            &ngx_mail_smtp_ext_module);
    if (cache->shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (cache->shm_zone->data) {
        return "is duplicate";
    }

    cache->shm_zone->init = ngx_mail_smtp_ext_cache_init_zone;
    cache->shm_zone->data = cache;

    smcf->cache = cache;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid smtp_ext_redis_cache parameter \"%V\"",
                       &value[i]);

    return NGX_CONF_ERROR;
}


/*
 * Servers may use different Redis servers (or databases) with the same
 * keys: the cache key starts with which Redis configuration answered.
 */

#define NGX_MAIL_SMTP_EXT_CACHE_NSKEY                                         \
    (sizeof(void *) + NGX_MAIL_SMTP_EXT_CACHE_KEY_MAX)

static ngx_str_t *
ngx_mail_smtp_ext_cache_key(ngx_mail_session_t *s, ngx_str_t *key,
    ngx_str_t *nskey, u_char *buf)
{
    void                          *ns;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);
    ns = sscf->redis;

    ngx_memcpy(buf, &ns, sizeof(void *));
    ngx_memcpy(buf + sizeof(void *), key->data, key->len);

    nskey->data = buf;
    nskey->len = sizeof(void *) + key->len;

    return nskey;
}


static ngx_mail_smtp_ext_cache_t *
ngx_mail_smtp_ext_cache_of(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_cache_t      *cache;
    ngx_mail_smtp_ext_main_conf_t  *smcf;

    smcf = ngx_mail_get_module_main_conf(s, ngx_mail_smtp_ext_module);
    cache = smcf->cache;

    return (cache && cache->sh) ? cache : NULL;
}


ngx_uint_t
ngx_mail_smtp_ext_cache_enabled(ngx_mail_session_t *s)
{
    return ngx_mail_smtp_ext_cache_of(s) != NULL;
}


/*
 * In the master, at start and reload.  A reload may still fail after the
 * zones (a listen that cannot be bound): the old workers then go on with
 * this zone, so it is emptied only once the new cycle is sure, in
 * ngx_mail_smtp_ext_cache_init_module().
 */

static ngx_int_t
ngx_mail_smtp_ext_cache_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_mail_smtp_ext_cache_t *cache = shm_zone->data;

    ngx_slab_pool_t               *shpool;
    ngx_mail_smtp_ext_cache_sh_t  *sh;

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;
    cache->shpool = shpool;

    if (data && shpool->data) {
        cache->sh = shpool->data;
        cache->reloaded = 1;
        return NGX_OK;
    }

    sh = ngx_slab_alloc(shpool, sizeof(ngx_mail_smtp_ext_cache_sh_t));
    if (sh == NULL) {
        return NGX_ERROR;
    }

    ngx_rbtree_init(&sh->rbtree, &sh->sentinel,
                    ngx_mail_smtp_ext_cache_insert);
    ngx_queue_init(&sh->lru);
    sh->generation = 0;
    cache->generation = 0;

    shpool->data = sh;
    shpool->log_nomem = 0;
    cache->sh = sh;

    return NGX_OK;
}


/* in the master, the new cycle is sure: a reload empties the cache */

void
ngx_mail_smtp_ext_cache_init_module(ngx_mail_smtp_ext_main_conf_t *smcf)
{
    ngx_queue_t                     *q;
    ngx_slab_pool_t                 *shpool;
    ngx_mail_smtp_ext_cache_t       *cache;
    ngx_mail_smtp_ext_cache_sh_t    *sh;
    ngx_mail_smtp_ext_cache_node_t  *node;

    cache = smcf->cache;

    if (cache == NULL || cache->sh == NULL || !cache->reloaded) {
        return;
    }

    cache->reloaded = 0;

    shpool = cache->shpool;
    sh = cache->sh;

    ngx_shmtx_lock(&shpool->mutex);

    while (!ngx_queue_empty(&sh->lru)) {
        q = ngx_queue_last(&sh->lru);
        node = ngx_queue_data(q, ngx_mail_smtp_ext_cache_node_t, queue);
        ngx_queue_remove(q);
        ngx_rbtree_delete(&sh->rbtree, &node->node);
        ngx_slab_free_locked(shpool, node);
    }

    /*
     * Workers of the old cycle go on until their sessions end: from now
     * on they neither read nor write here.  Their configuration (whose
     * address names the Redis in every key) is freed at a later reload
     * and its address may be taken again.
     */

    cache->generation = ++sh->generation;

    ngx_shmtx_unlock(&shpool->mutex);
}


/* ordered by crc32, then by the key's octets: a total order */

static ngx_int_t
ngx_mail_smtp_ext_cache_cmp(uint32_t hash, u_char *key, size_t len,
    ngx_mail_smtp_ext_cache_node_t *cn)
{
    if (hash != cn->node.key) {
        return (hash < cn->node.key) ? -1 : 1;
    }

    return ngx_memn2cmp(key, cn->data, len, cn->klen);
}


static void
ngx_mail_smtp_ext_cache_insert(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel)
{
    ngx_rbtree_node_t               **p;
    ngx_mail_smtp_ext_cache_node_t   *cn;

    cn = (ngx_mail_smtp_ext_cache_node_t *) node;

    for ( ;; ) {

        p = (ngx_mail_smtp_ext_cache_cmp((uint32_t) node->key, cn->data,
                                         cn->klen,
                                         (ngx_mail_smtp_ext_cache_node_t *)
                                             temp)
             < 0)
            ? &temp->left : &temp->right;

        if (*p == sentinel) {
            break;
        }

        temp = *p;
    }

    *p = node;
    node->parent = temp;
    node->left = sentinel;
    node->right = sentinel;
    ngx_rbt_red(node);
}


static ngx_mail_smtp_ext_cache_node_t *
ngx_mail_smtp_ext_cache_find(ngx_mail_smtp_ext_cache_t *cache,
    ngx_str_t *key, uint32_t hash)
{
    ngx_int_t                        rc;
    ngx_rbtree_node_t               *node, *sentinel;
    ngx_mail_smtp_ext_cache_node_t  *cn;

    node = cache->sh->rbtree.root;
    sentinel = cache->sh->rbtree.sentinel;

    while (node != sentinel) {
        cn = (ngx_mail_smtp_ext_cache_node_t *) node;

        rc = ngx_mail_smtp_ext_cache_cmp(hash, key->data, key->len, cn);

        if (rc == 0) {
            return cn;
        }

        node = (rc < 0) ? node->left : node->right;
    }

    return NULL;
}


/*
 * NGX_OK: a fresh result; NGX_DONE: one past "valid" but within "stale"
 * (only when stale_ok); NGX_DECLINED: nothing usable.  value->data is
 * NULL for a key Redis did not have; otherwise the value is copied into
 * buf (NGX_MAIL_SMTP_EXT_CACHE_VALUE_MAX octets).
 */

ngx_int_t
ngx_mail_smtp_ext_cache_get(ngx_mail_session_t *s, ngx_str_t *key,
    u_char *buf, ngx_str_t *value, ngx_uint_t stale_ok)
{
    uint32_t                         hash;
    ngx_int_t                        rc;
    ngx_str_t                        nskey;
    ngx_msec_int_t                   age;
    u_char                           kbuf[NGX_MAIL_SMTP_EXT_CACHE_NSKEY];
    ngx_mail_smtp_ext_cache_t       *cache;
    ngx_mail_smtp_ext_cache_node_t  *cn;

    cache = ngx_mail_smtp_ext_cache_of(s);

    if (cache == NULL || key->len > NGX_MAIL_SMTP_EXT_CACHE_KEY_MAX) {
        return NGX_DECLINED;
    }

    key = ngx_mail_smtp_ext_cache_key(s, key, &nskey, kbuf);
    hash = ngx_crc32_short(key->data, key->len);

    ngx_shmtx_lock(&cache->shpool->mutex);

    cn = (cache->generation == cache->sh->generation)
         ? ngx_mail_smtp_ext_cache_find(cache, key, hash) : NULL;

    if (cn == NULL) {
        ngx_shmtx_unlock(&cache->shpool->mutex);
        return NGX_DECLINED;
    }

    age = (ngx_msec_int_t) (ngx_current_msec - cn->stored);

    if (age >= 0 && (ngx_msec_t) age < cache->valid) {
        rc = NGX_OK;

    } else if (stale_ok && age >= 0
               && (ngx_msec_t) age < cache->valid + cache->stale)
    {
        rc = NGX_DONE;

    } else {
        ngx_shmtx_unlock(&cache->shpool->mutex);
        return NGX_DECLINED;
    }

    if (cn->absent) {
        value->data = NULL;
        value->len = 0;

    } else {
        value->len = cn->vlen;
        value->data = ngx_cpymem(buf, cn->data + cn->klen, cn->vlen)
                      - cn->vlen;
    }

    ngx_queue_remove(&cn->queue);
    ngx_queue_insert_head(&cache->sh->lru, &cn->queue);

    ngx_shmtx_unlock(&cache->shpool->mutex);

    return rc;
}


/* what Redis answered; value->data NULL for absence */

void
ngx_mail_smtp_ext_cache_put(ngx_mail_session_t *s, ngx_str_t *key,
    ngx_str_t *value)
{
    size_t                           n;
    uint32_t                         hash;
    ngx_str_t                        nskey;
    ngx_queue_t                     *q;
    u_char                           kbuf[NGX_MAIL_SMTP_EXT_CACHE_NSKEY];
    ngx_mail_smtp_ext_cache_t       *cache;
    ngx_mail_smtp_ext_cache_node_t  *cn, *old;

    cache = ngx_mail_smtp_ext_cache_of(s);

    if (cache == NULL
        || key->len > NGX_MAIL_SMTP_EXT_CACHE_KEY_MAX
        || value->len > NGX_MAIL_SMTP_EXT_CACHE_VALUE_MAX)
    {
        return;
    }

    key = ngx_mail_smtp_ext_cache_key(s, key, &nskey, kbuf);
    hash = ngx_crc32_short(key->data, key->len);
    n = offsetof(ngx_mail_smtp_ext_cache_node_t, data) + key->len
        + value->len;

    ngx_shmtx_lock(&cache->shpool->mutex);

    if (cache->generation != cache->sh->generation) {
        /* a worker of a cycle before the last reload */
        ngx_shmtx_unlock(&cache->shpool->mutex);
        return;
    }

    old = ngx_mail_smtp_ext_cache_find(cache, key, hash);

    if (old) {
        ngx_queue_remove(&old->queue);
        ngx_rbtree_delete(&cache->sh->rbtree, &old->node);
        ngx_slab_free_locked(cache->shpool, old);
    }

    /* full: the least recently used make room */

    for ( ;; ) {
        cn = ngx_slab_alloc_locked(cache->shpool, n);

        if (cn || ngx_queue_empty(&cache->sh->lru)) {
            break;
        }

        q = ngx_queue_last(&cache->sh->lru);
        old = ngx_queue_data(q, ngx_mail_smtp_ext_cache_node_t, queue);
        ngx_queue_remove(q);
        ngx_rbtree_delete(&cache->sh->rbtree, &old->node);
        ngx_slab_free_locked(cache->shpool, old);
    }

    if (cn == NULL) {
        ngx_shmtx_unlock(&cache->shpool->mutex);
        return;
    }

    cn->node.key = hash;
    cn->stored = ngx_current_msec;
    cn->klen = (u_short) key->len;
    cn->vlen = (u_short) value->len;
    cn->absent = (value->data == NULL);
    ngx_memcpy(cn->data, key->data, key->len);

    if (value->len) {
        ngx_memcpy(cn->data + key->len, value->data, value->len);
    }

    ngx_rbtree_insert(&cache->sh->rbtree, &cn->node);
    ngx_queue_insert_head(&cache->sh->lru, &cn->queue);

    ngx_shmtx_unlock(&cache->shpool->mutex);
}
