
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * Edge protection at the session's start (SPEC §10): smtp_ext_limit_exempt,
 * smtp_ext_limit_conn (concurrent sessions per client address, IPv6 per
 * /64, node-wide in shared memory), and the order of the checks before
 * the greeting: exempt, limit_conn, the "connect" rate limit, then the
 * DNSBL lookups alongside the greeting delay.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>

#include "ngx_mail_smtp_ext_module.h"
#include "ngx_mail_smtp_ext_edge.h"


/* one zone for the node: a client's sessions on every server count */
#define NGX_MAIL_SMTP_EXT_LIMIT_ZONE       "smtp_ext_limit_conn"
#define NGX_MAIL_SMTP_EXT_LIMIT_ZONE_SIZE  (4 * 1024 * 1024)


typedef struct {
    ngx_rbtree_t                    rbtree;
    ngx_rbtree_node_t               sentinel;
} ngx_mail_smtp_ext_limit_sh_t;


typedef struct {
    ngx_mail_smtp_ext_limit_sh_t   *sh;
    ngx_slab_pool_t                *shpool;
} ngx_mail_smtp_ext_limit_ctx_t;


typedef struct {
    ngx_rbtree_node_t               node;       /* key: crc32 of addr */
    ngx_uint_t                      conns;
    u_char                          len;
    u_char                          addr[8];    /* IPv4, or an IPv6 /64 */
} ngx_mail_smtp_ext_limit_node_t;


static ngx_int_t ngx_mail_smtp_ext_limit_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static void ngx_mail_smtp_ext_limit_insert(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel);
static ngx_int_t ngx_mail_smtp_ext_limit_acquire(ngx_mail_session_t *s,
    ngx_mail_smtp_ext_edge_t *edge);
static void ngx_mail_smtp_ext_edge_stop(ngx_mail_session_t *s);
static void ngx_mail_smtp_ext_edge_cleanup(void *data);


static ngx_str_t  ngx_mail_smtp_ext_too_many_conns =
    ngx_string("421 4.7.0 Too many connections from your address" CRLF);


char *
ngx_mail_smtp_ext_limit_exempt(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_mail_smtp_ext_srv_conf_t *sscf = conf;

    ngx_int_t    rc;
    ngx_str_t   *value;
    ngx_uint_t   i;
    ngx_cidr_t  *cidr;

    if (sscf->limit_exempt) {
        return "is duplicate";
    }

    sscf->limit_exempt = ngx_array_create(cf->pool, cf->args->nelts - 1,
                                          sizeof(ngx_cidr_t));
    if (sscf->limit_exempt == NULL) {
        return NGX_CONF_ERROR;
    }

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {
        cidr = ngx_array_push(sscf->limit_exempt);
        if (cidr == NULL) {
            return NGX_CONF_ERROR;
        }

        rc = ngx_ptocidr(&value[i], cidr);

        if (rc == NGX_ERROR) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid network \"%V\"", &value[i]);
            return NGX_CONF_ERROR;
        }

        if (rc == NGX_DONE) {
            ngx_conf_log_error(NGX_LOG_WARN, cf, 0,
                               "low address bits of %V are meaningless",
                               &value[i]);
        }
    }

    return NGX_CONF_OK;
}


char *
ngx_mail_smtp_ext_limit_conn(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_mail_smtp_ext_srv_conf_t *sscf = conf;

    ngx_int_t                       n;
    ngx_str_t                      *value, name;
    ngx_shm_zone_t                 *shm_zone;
    ngx_mail_smtp_ext_limit_ctx_t  *lctx;

    if (sscf->limit_conn != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {
        sscf->limit_conn = 0;
        return NGX_CONF_OK;
    }

    n = ngx_atoi(value[1].data, value[1].len);
    if (n == NGX_ERROR || n == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid number \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    sscf->limit_conn = n;

    ngx_str_set(&name, NGX_MAIL_SMTP_EXT_LIMIT_ZONE);

    shm_zone = ngx_shared_memory_add(cf, &name,
                                     NGX_MAIL_SMTP_EXT_LIMIT_ZONE_SIZE,
                                     &ngx_mail_smtp_ext_module);
    if (shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (shm_zone->data == NULL) {
        lctx = ngx_pcalloc(cf->pool, sizeof(ngx_mail_smtp_ext_limit_ctx_t));
        if (lctx == NULL) {
            return NGX_CONF_ERROR;
        }

        shm_zone->init = ngx_mail_smtp_ext_limit_init_zone;
        shm_zone->data = lctx;
    }

    sscf->limit_zone = shm_zone;

    return NGX_CONF_OK;
}


void
ngx_mail_smtp_ext_edge_create_conf(void *conf)
{
    ngx_mail_smtp_ext_srv_conf_t *sscf = conf;

    /*
     * set by ngx_pcalloc():
     *
     *     sscf->limit_exempt = NULL;
     *     sscf->limit_zone = NULL;
     *     sscf->ratelimits = NULL;
     *     sscf->dnsbl = NULL;
     */

    sscf->limit_conn = NGX_CONF_UNSET_UINT;
    sscf->greeting_delay = NGX_CONF_UNSET_MSEC;
    sscf->dnsbl_threshold = NGX_CONF_UNSET_UINT;
}


char *
ngx_mail_smtp_ext_edge_merge_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_mail_smtp_ext_srv_conf_t *prev = parent;
    ngx_mail_smtp_ext_srv_conf_t *conf = child;

    if (conf->limit_exempt == NULL) {
        conf->limit_exempt = prev->limit_exempt;
    }

    if (conf->limit_conn == NGX_CONF_UNSET_UINT) {
        conf->limit_conn = prev->limit_conn;
        conf->limit_zone = prev->limit_zone;
    }

    if (conf->limit_conn == NGX_CONF_UNSET_UINT) {
        conf->limit_conn = 0;
    }

    if (conf->ratelimits == NULL) {
        conf->ratelimits = prev->ratelimits;
    }

    ngx_conf_merge_msec_value(conf->greeting_delay, prev->greeting_delay, 0);

    /* a server's own smtp_ext_dnsbl list replaces the mail-level one */

    if (conf->dnsbl == NULL) {
        conf->dnsbl = prev->dnsbl;
    }

    ngx_conf_merge_uint_value(conf->dnsbl_threshold, prev->dnsbl_threshold,
                              1);

    if (conf->dnsbl_threshold == 0) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"smtp_ext_dnsbl_threshold\" must be at least 1 "
                      "in %s:%ui", conf->file_name, conf->line);
        return NGX_CONF_ERROR;
    }

    if (conf->ratelimits && conf->ratelimits->nelts && conf->redis == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"smtp_ext_ratelimit\" needs \"smtp_ext_redis\" "
                      "in %s:%ui", conf->file_name, conf->line);
        return NGX_CONF_ERROR;
    }

    return ngx_mail_smtp_ext_dnsbl_merge(cf, conf);
}


static ngx_int_t
ngx_mail_smtp_ext_limit_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_mail_smtp_ext_limit_ctx_t  *octx = data;

    size_t                          len;
    ngx_mail_smtp_ext_limit_ctx_t  *lctx;

    lctx = shm_zone->data;

    if (octx) {
        /* a reload: the sessions of the old workers still count */
        lctx->sh = octx->sh;
        lctx->shpool = octx->shpool;
        return NGX_OK;
    }

    lctx->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        lctx->sh = lctx->shpool->data;
        return NGX_OK;
    }

    lctx->sh = ngx_slab_alloc(lctx->shpool,
                              sizeof(ngx_mail_smtp_ext_limit_sh_t));
    if (lctx->sh == NULL) {
        return NGX_ERROR;
    }

    lctx->shpool->data = lctx->sh;

    ngx_rbtree_init(&lctx->sh->rbtree, &lctx->sh->sentinel,
                    ngx_mail_smtp_ext_limit_insert);

    len = sizeof(" in smtp_ext_limit_conn zone \"\"") + shm_zone->shm.name.len;

    lctx->shpool->log_ctx = ngx_slab_alloc(lctx->shpool, len);
    if (lctx->shpool->log_ctx == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(lctx->shpool->log_ctx, " in smtp_ext_limit_conn zone \"%V\"%Z",
                &shm_zone->shm.name);

    /* a full zone lets clients in (logged once per session), no alert */
    lctx->shpool->log_nomem = 0;

    return NGX_OK;
}


static void
ngx_mail_smtp_ext_limit_insert(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel)
{
    ngx_rbtree_node_t              **p;
    ngx_mail_smtp_ext_limit_node_t  *ln, *lnt;

    for ( ;; ) {

        if (node->key < temp->key) {
            p = &temp->left;

        } else if (node->key > temp->key) {
            p = &temp->right;

        } else {
            ln = (ngx_mail_smtp_ext_limit_node_t *) node;
            lnt = (ngx_mail_smtp_ext_limit_node_t *) temp;

            p = (ngx_memn2cmp(ln->addr, lnt->addr, ln->len, lnt->len) < 0)
                ? &temp->left : &temp->right;
        }

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


/*
 * The client's address as a key: 4 octets of IPv4 (an IPv4-mapped IPv6
 * address too), the 8 octets of an IPv6 /64.  AF_INET or AF_INET6; 0
 * for a client without an IP address (a unix socket).
 */

ngx_uint_t
ngx_mail_smtp_ext_edge_ip_key(ngx_mail_session_t *s, u_char *buf,
    size_t *len)
{
    struct sockaddr_in   *sin;
#if (NGX_HAVE_INET6)
    u_char               *p;
    struct sockaddr_in6  *sin6;
#endif

    switch (s->connection->sockaddr->sa_family) {

    case AF_INET:
        sin = (struct sockaddr_in *) s->connection->sockaddr;
        ngx_memcpy(buf, &sin->sin_addr, 4);
        *len = 4;
        return AF_INET;

#if (NGX_HAVE_INET6)
    case AF_INET6:
        sin6 = (struct sockaddr_in6 *) s->connection->sockaddr;
        p = sin6->sin6_addr.s6_addr;

        if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
            ngx_memcpy(buf, p + 12, 4);
            *len = 4;
            return AF_INET;
        }

        ngx_memcpy(buf, p, 8);
        *len = 8;
        return AF_INET6;
#endif

    default:
        return 0;
    }
}


/* NGX_OK: a slot is taken (or none is needed); NGX_BUSY: over the limit */

static ngx_int_t
ngx_mail_smtp_ext_limit_acquire(ngx_mail_session_t *s,
    ngx_mail_smtp_ext_edge_t *edge)
{
    size_t                           len;
    u_char                           addr[8];
    uint32_t                         hash;
    ngx_int_t                        rc;
    ngx_rbtree_node_t               *node, *sentinel;
    ngx_mail_smtp_ext_limit_ctx_t   *lctx;
    ngx_mail_smtp_ext_limit_node_t  *ln;
    ngx_mail_smtp_ext_srv_conf_t    *sscf;

    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    if (ngx_mail_smtp_ext_edge_ip_key(s, addr, &len) == 0) {
        return NGX_OK;
    }

    lctx = sscf->limit_zone->data;
    hash = ngx_crc32_short(addr, len);

    ngx_shmtx_lock(&lctx->shpool->mutex);

    node = lctx->sh->rbtree.root;
    sentinel = lctx->sh->rbtree.sentinel;
    ln = NULL;

    while (node != sentinel) {

        if (hash < node->key) {
            node = node->left;
            continue;
        }

        if (hash > node->key) {
            node = node->right;
            continue;
        }

        ln = (ngx_mail_smtp_ext_limit_node_t *) node;

        rc = ngx_memn2cmp(addr, ln->addr, len, ln->len);

        if (rc == 0) {
            break;
        }

        ln = NULL;
        node = (rc < 0) ? node->left : node->right;
    }

    if (ln == NULL) {
        ln = ngx_slab_alloc_locked(lctx->shpool,
                                   sizeof(ngx_mail_smtp_ext_limit_node_t));
        if (ln == NULL) {
            ngx_shmtx_unlock(&lctx->shpool->mutex);

            ngx_log_error(NGX_LOG_WARN, s->connection->log, 0,
                          "smtp_ext: smtp_ext_limit_conn zone is full, "
                          "client %V not counted",
                          &s->connection->addr_text);
            return NGX_OK;
        }

        ln->node.key = hash;
        ln->conns = 0;
        ln->len = (u_char) len;
        ngx_memcpy(ln->addr, addr, len);

        ngx_rbtree_insert(&lctx->sh->rbtree, &ln->node);
    }

    if (ln->conns >= sscf->limit_conn) {
        ngx_shmtx_unlock(&lctx->shpool->mutex);
        return NGX_BUSY;
    }

    ln->conns++;

    ngx_shmtx_unlock(&lctx->shpool->mutex);

    edge->limit_zone = sscf->limit_zone;
    edge->limit_node = ln;

    return NGX_OK;
}


/* gives the session's limit_conn slot back: at a refusal, or at the end */

void
ngx_mail_smtp_ext_edge_release(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_edge_t        *edge;
    ngx_mail_smtp_ext_limit_ctx_t   *lctx;
    ngx_mail_smtp_ext_limit_node_t  *ln;
    ngx_mail_smtp_ext_ctx_t         *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    edge = ctx->edge;

    if (edge == NULL || edge->limit_node == NULL) {
        return;
    }

    lctx = edge->limit_zone->data;
    ln = edge->limit_node;
    edge->limit_node = NULL;

    ngx_shmtx_lock(&lctx->shpool->mutex);

    if (--ln->conns == 0) {
        ngx_rbtree_delete(&lctx->sh->rbtree, &ln->node);
        ngx_slab_free_locked(lctx->shpool, ln);
    }

    ngx_shmtx_unlock(&lctx->shpool->mutex);
}


ngx_mail_smtp_ext_edge_t *
ngx_mail_smtp_ext_edge_get(ngx_mail_session_t *s)
{
    ngx_connection_t              *c;
    ngx_pool_cleanup_t            *cln;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_edge_t      *edge;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (ctx->edge) {
        return ctx->edge;
    }

    c = s->connection;
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    edge = ngx_pcalloc(c->pool, sizeof(ngx_mail_smtp_ext_edge_t));
    cln = ngx_pool_cleanup_add(c->pool, 0);

    if (edge == NULL || cln == NULL) {
        return NULL;
    }

    edge->session = s;

    if (sscf->limit_exempt
        && ngx_cidr_match(c->sockaddr, sscf->limit_exempt) == NGX_OK)
    {
        edge->exempt = 1;
    }

    cln->handler = ngx_mail_smtp_ext_edge_cleanup;
    cln->data = s;

    ctx->edge = edge;

    return edge;
}


ngx_int_t
ngx_mail_smtp_ext_edge_start(ngx_mail_session_t *s)
{
    ngx_int_t                      rc;
    ngx_mail_smtp_ext_edge_t      *edge;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    if (sscf->limit_conn == 0
        && sscf->ratelimits == NULL
        && sscf->greeting_delay == 0
        && (sscf->dnsbl == NULL || sscf->dnsbl->nelts == 0))
    {
        return NGX_OK;
    }

    edge = ngx_mail_smtp_ext_edge_get(s);
    if (edge == NULL) {
        ngx_mail_close_connection(s->connection);
        return NGX_DONE;
    }

    if (edge->exempt) {
        return NGX_OK;
    }

    edge->holding = 1;

    if (sscf->limit_conn) {
        if (ngx_mail_smtp_ext_limit_acquire(s, edge) == NGX_BUSY) {
            ngx_mail_smtp_ext_metric_reject(s, NGX_SMTP_EXT_M_LIMIT_CONN);
            ngx_mail_smtp_ext_edge_refuse(s, &ngx_mail_smtp_ext_too_many_conns,
                                          "too many connections");
            return NGX_DONE;
        }
    }

    /* with a greeting delay, any input before the greeting is pregreet */

    if (sscf->greeting_delay) {
        s->connection->read->handler = ngx_mail_smtp_ext_pregreet_handler;
    }

    rc = ngx_mail_smtp_ext_ratelimit_check(s, NGX_MAIL_SMTP_EXT_RL_CONNECT);

    if (rc == NGX_AGAIN) {
        return NGX_OK;
    }

    if (rc == NGX_DONE) {
        return NGX_DONE;
    }

    return ngx_mail_smtp_ext_dnsbl_start(s);
}


/* the "connect" rate limit let the client in: DNSBL and greeting delay */

void
ngx_mail_smtp_ext_edge_next(ngx_mail_session_t *s)
{
    (void) ngx_mail_smtp_ext_dnsbl_start(s);
}


ngx_uint_t
ngx_mail_smtp_ext_edge_hold(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t   *ctx;
    ngx_mail_smtp_ext_edge_t  *edge;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    edge = ctx->edge;

    if (edge == NULL || !edge->holding) {
        return 0;
    }

    edge->greet_wanted = 1;

    return 1;
}


void
ngx_mail_smtp_ext_edge_refuse(ngx_mail_session_t *s, ngx_str_t *reply,
    const char *reason)
{
    ngx_connection_t          *c;
    ngx_mail_smtp_ext_ctx_t   *ctx;
    ngx_mail_smtp_ext_edge_t  *edge;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    edge = ctx->edge;

    ngx_log_error(NGX_LOG_INFO, c->log, 0,
                  "smtp_ext: client %V refused: %s", &c->addr_text, reason);

    /*
     * No greeting ever, nothing more to wait for while the reply goes;
     * SPEC 10: a refused session never counts, lingering or not.
     */

    edge->holding = 1;
    ngx_mail_smtp_ext_edge_stop(s);

    c->read->handler = ngx_mail_smtp_ext_auth_state;

    ngx_mail_smtp_ext_refuse(s, reply);
}


/* the edge checks end: timers, DNSBL lookups, the limit_conn slot */

static void
ngx_mail_smtp_ext_edge_stop(ngx_mail_session_t *s)
{
    ngx_uint_t                 i;
    ngx_mail_smtp_ext_ctx_t   *ctx;
    ngx_mail_smtp_ext_edge_t  *edge;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    edge = ctx->edge;

    edge->done = 1;

    if (edge->delay.timer_set) {
        ngx_del_timer(&edge->delay);
    }

    for (i = 0; edge->dnsbl_ctx && edge->dnsbl_pending; i++) {
        if (edge->dnsbl_ctx[i]) {
            ngx_resolve_name_done(edge->dnsbl_ctx[i]);
            edge->dnsbl_ctx[i] = NULL;
            edge->dnsbl_pending--;
        }
    }

    ngx_mail_smtp_ext_edge_release(s);
}


static void
ngx_mail_smtp_ext_edge_cleanup(void *data)
{
    ngx_mail_session_t  *s = data;

    ngx_mail_smtp_ext_ctx_t   *ctx;
    ngx_mail_smtp_ext_edge_t  *edge;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    edge = ctx->edge;

    ngx_mail_smtp_ext_edge_stop(s);

    if (edge->rl_pool) {
        ngx_destroy_pool(edge->rl_pool);
        edge->rl_pool = NULL;
    }
}
