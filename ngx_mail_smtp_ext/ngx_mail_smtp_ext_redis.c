
/*
 * ngx_mail_smtp_ext: per-worker hiredis async connections on the nginx
 * event loop.
 *
 * One connection per worker and Redis server, shared by all sessions;
 * commands are pipelined and hiredis runs their callbacks in FIFO order.
 * The fd belongs to hiredis (it closes it); we only wrap it in an
 * ngx_connection_t with level-triggered events.
 *
 * Replies are built by our reader functions (..._redis_reader.c), which
 * bound their size and refuse a reply no command waits for; any such
 * refusal drops the connection like an I/O error (docs/redis.md).
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>

#include "ngx_mail_smtp_ext_redis.h"
#include "ngx_mail_smtp_ext_metrics.h"
#include "ngx_mail_smtp_ext_redis_reader.h"


#define NGX_MAIL_SMTP_EXT_REDIS_PORT          6379
#define NGX_MAIL_SMTP_EXT_REDIS_BACKOFF_MIN   100
#define NGX_MAIL_SMTP_EXT_REDIS_BACKOFF_MAX   5000
#define NGX_MAIL_SMTP_EXT_REDIS_MAX_TIMEOUTS  3
#define NGX_MAIL_SMTP_EXT_SENTINEL_PORT       26379
#define NGX_MAIL_SMTP_EXT_SENTINEL_MAX_REPLY  4096


typedef struct {
    ngx_mail_smtp_ext_redis_conf_t      *conf;
    redisAsyncContext                   *ac;
    ngx_connection_t                    *conn;
    ngx_event_t                          reconnect;
    ngx_event_t                          connect_timer;
    ngx_msec_t                           backoff;
    ngx_uint_t                           timeouts;
    ngx_uint_t                           setup_pending;
    ngx_mail_smtp_ext_redis_reader_t     reader;   /* limits of replies */

    /* sentinel:NAME: the master in use and the discovery in progress */
    ngx_str_t                            master;   /* "ip:port", for logs */
    u_char                               host[NGX_SOCKADDR_STRLEN + 1];
    in_port_t                            port;
    ngx_uint_t                           next;     /* sentinel to ask */
    ngx_uint_t                           asked;    /* in this round */
    ngx_peer_connection_t                peer;     /* to a sentinel */
    redisReader                         *sreader;
    size_t                               sread;
    ngx_str_t                            sout;     /* left to send */
    u_char                              *sbuf;
    u_char                               master_text[NGX_SOCKADDR_STRLEN];

    unsigned                             writing:1;
    unsigned                             have_master:1;
    unsigned                             sauth:1;  /* AUTH reply due */
} ngx_mail_smtp_ext_redis_srv_t;


typedef struct {
    ngx_queue_t                          queue;
    ngx_mail_smtp_ext_redis_srv_t       *srv;
    ngx_mail_smtp_ext_redis_handler_pt   handler;
    void                                *data;
    ngx_pool_cleanup_t                  *cln;
    ngx_event_t                          ev;       /* timeout or failure */
    ngx_uint_t                           n;
    ngx_uint_t                           pending;  /* hiredis callbacks due */
    ngx_uint_t                           received;
    unsigned                             done:1;   /* handler called/gone */
    unsigned                             failed:1;
    unsigned                             fast:1;   /* failed before sending */
    redisReply                          *replies[1];
} ngx_mail_smtp_ext_redis_req_t;


static void ngx_mail_smtp_ext_redis_connect(
    ngx_mail_smtp_ext_redis_srv_t *srv);
static void ngx_mail_smtp_ext_redis_schedule(
    ngx_mail_smtp_ext_redis_srv_t *srv);
static void ngx_mail_smtp_ext_redis_reconnect_handler(ngx_event_t *ev);
static void ngx_mail_smtp_ext_redis_connect_timeout(ngx_event_t *ev);
static void ngx_mail_smtp_ext_redis_read_handler(ngx_event_t *rev);
static void ngx_mail_smtp_ext_redis_write_handler(ngx_event_t *wev);
static void ngx_mail_smtp_ext_redis_add_read(void *privdata);
static void ngx_mail_smtp_ext_redis_del_read(void *privdata);
static void ngx_mail_smtp_ext_redis_add_write(void *privdata);
static void ngx_mail_smtp_ext_redis_del_write(void *privdata);
static void ngx_mail_smtp_ext_redis_cleanup(void *privdata);
static int ngx_mail_smtp_ext_redis_expected(void *data);
static void ngx_mail_smtp_ext_redis_on_connect(const redisAsyncContext *ac,
    int status);
static void ngx_mail_smtp_ext_redis_on_disconnect(const redisAsyncContext *ac,
    int status);
static void ngx_mail_smtp_ext_redis_setup_handler(redisAsyncContext *ac,
    void *r, void *privdata);
static void ngx_mail_smtp_ext_redis_cmd_handler(redisAsyncContext *ac,
    void *r, void *privdata);
static void ngx_mail_smtp_ext_redis_req_event(ngx_event_t *ev);
static void ngx_mail_smtp_ext_redis_req_cleanup(void *data);
static void ngx_mail_smtp_ext_redis_cleanup_unused(void *data);
static ngx_pool_cleanup_t *ngx_mail_smtp_ext_redis_cleanup_get(
    ngx_pool_t *pool);
static void ngx_mail_smtp_ext_redis_finish(ngx_mail_smtp_ext_redis_req_t *req,
    ngx_uint_t ok);
static void ngx_mail_smtp_ext_redis_release(
    ngx_mail_smtp_ext_redis_req_t *req);
static ngx_uint_t ngx_mail_smtp_ext_redis_str_eq(ngx_str_t *a,
    ngx_str_t *b);
static void ngx_mail_smtp_ext_redis_role_handler(redisAsyncContext *ac,
    void *r, void *privdata);
static void ngx_mail_smtp_ext_sentinel_ask(
    ngx_mail_smtp_ext_redis_srv_t *srv);
static void ngx_mail_smtp_ext_sentinel_handler(ngx_event_t *ev);
static ngx_int_t ngx_mail_smtp_ext_sentinel_result(
    ngx_mail_smtp_ext_redis_srv_t *srv, redisReply *r);
static void ngx_mail_smtp_ext_sentinel_close(
    ngx_mail_smtp_ext_redis_srv_t *srv);
static void ngx_mail_smtp_ext_sentinel_failed(
    ngx_mail_smtp_ext_redis_srv_t *srv, const char *why);
static size_t ngx_mail_smtp_ext_redis_reply_size(redisReply *r);
static redisReply *ngx_mail_smtp_ext_redis_reply_copy(redisReply *r,
    u_char **pos);


static ngx_mail_smtp_ext_redis_srv_t  *ngx_mail_smtp_ext_redis_srvs;
static ngx_uint_t                      ngx_mail_smtp_ext_redis_nsrvs;
static ngx_queue_t                     ngx_mail_smtp_ext_redis_reqs;
static ngx_uint_t                      ngx_mail_smtp_ext_redis_exiting;


/* configuration */

char *
ngx_mail_smtp_ext_redis_parse(ngx_conf_t *cf, ngx_array_t *servers,
    ngx_mail_smtp_ext_redis_conf_t **rcfp)
{
    u_char                           *p;
    size_t                            len;
    ngx_int_t                         rc, n;
    ngx_str_t                        *value, s;
    ngx_uint_t                        i, index, found;
    ngx_addr_t                        addr;
    in_port_t                         port;
    ngx_mail_smtp_ext_redis_conf_t   *rcf, **rcfs;
    u_char                            text[NGX_SOCKADDR_STRLEN];

    value = cf->args->elts;

    if (servers->nalloc == 0) {
        if (ngx_array_init(servers, cf->pool, 2,
                           sizeof(ngx_mail_smtp_ext_redis_conf_t *))
            != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    rcf = ngx_pcalloc(cf->pool, sizeof(ngx_mail_smtp_ext_redis_conf_t));
    if (rcf == NULL) {
        return NGX_CONF_ERROR;
    }

    rcf->name = value[1];
    rcf->timeout = NGX_MAIL_SMTP_EXT_REDIS_TIMEOUT;

    if (value[1].len > 9 && ngx_strncmp(value[1].data, "sentinel:", 9) == 0) {

        /* resolved after the mail block: it may be defined later */
        rcf->sentinel_name.data = value[1].data + 9;
        rcf->sentinel_name.len = value[1].len - 9;

    } else if (value[1].len > 5
               && ngx_strncmp(value[1].data, "unix:", 5) == 0)
    {

        len = value[1].len - 5;

        if (len >= sizeof(((struct sockaddr_un *) 0)->sun_path)) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "unix socket path too long in \"%V\"",
                               &value[1]);
            return NGX_CONF_ERROR;
        }

        p = ngx_pnalloc(cf->pool, len + 1);
        if (p == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_memcpy(p, value[1].data + 5, len);
        p[len] = '\0';

        rcf->unix_path.data = p;
        rcf->unix_path.len = len;

    } else {
        ngx_memzero(&addr, sizeof(ngx_addr_t));

        rc = ngx_parse_addr_port(cf->pool, &addr, value[1].data,
                                 value[1].len);

        if (rc == NGX_ERROR) {
            return NGX_CONF_ERROR;
        }

        if (rc == NGX_DECLINED) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid Redis address \"%V\": use an IP "
                               "address (IPv4 \"127.0.0.1:6379\", IPv6 "
                               "\"[::1]:6379\") or \"unix:/path\", host "
                               "names are not resolved", &value[1]);
            return NGX_CONF_ERROR;
        }

        len = ngx_sock_ntop(addr.sockaddr, addr.socklen, text,
                            NGX_SOCKADDR_STRLEN, 0);

        p = ngx_pnalloc(cf->pool, len + 1);
        if (p == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_memcpy(p, text, len);
        p[len] = '\0';

        rcf->host.data = p;
        rcf->host.len = len;

        port = ngx_inet_get_port(addr.sockaddr);
        rcf->port = port ? port : NGX_MAIL_SMTP_EXT_REDIS_PORT;
    }

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "db=", 3) == 0) {
            n = ngx_atoi(value[i].data + 3, value[i].len - 3);
            if (n == NGX_ERROR) {
                goto invalid;
            }

            rcf->db = (ngx_uint_t) n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "password=", 9) == 0) {
            rcf->password.data = value[i].data + 9;
            rcf->password.len = value[i].len - 9;

            if (rcf->password.len == 0) {
                goto invalid;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "prefix=", 7) == 0) {
            rcf->prefix.data = value[i].data + 7;
            rcf->prefix.len = value[i].len - 7;
            continue;
        }

        if (ngx_strncmp(value[i].data, "timeout=", 8) == 0) {
            s.data = value[i].data + 8;
            s.len = value[i].len - 8;

            n = ngx_parse_time(&s, 0);
            if (n == NGX_ERROR || n == 0) {
                goto invalid;
            }

            rcf->timeout = (ngx_msec_t) n;
            continue;
        }

        goto invalid;
    }

    /*
     * definitions with the same server, db and password share one
     * connection; fully identical ones share the whole entry
     */

    rcfs = servers->elts;
    index = 0;
    found = 0;

    for (i = 0; i < servers->nelts; i++) {

        if (rcfs[i]->index >= index) {
            index = rcfs[i]->index + 1;
        }

        if (rcfs[i]->db != rcf->db
            || rcfs[i]->port != rcf->port
            || !ngx_mail_smtp_ext_redis_str_eq(&rcfs[i]->host, &rcf->host)
            || !ngx_mail_smtp_ext_redis_str_eq(&rcfs[i]->unix_path,
                                               &rcf->unix_path)
            || !ngx_mail_smtp_ext_redis_str_eq(&rcfs[i]->sentinel_name,
                                               &rcf->sentinel_name)
            || !ngx_mail_smtp_ext_redis_str_eq(&rcfs[i]->password,
                                               &rcf->password))
        {
            continue;
        }

        if (rcfs[i]->timeout == rcf->timeout
            && ngx_mail_smtp_ext_redis_str_eq(&rcfs[i]->prefix, &rcf->prefix))
        {
            *rcfp = rcfs[i];
            return NGX_CONF_OK;
        }

        rcf->index = rcfs[i]->index;
        found = 1;
    }

    if (!found) {
        rcf->index = index;
    }

    rcfs = ngx_array_push(servers);
    if (rcfs == NULL) {
        return NGX_CONF_ERROR;
    }

    *rcfs = rcf;
    *rcfp = rcf;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);

    return NGX_CONF_ERROR;
}


char *
ngx_mail_smtp_ext_redis_sentinel_parse(ngx_conf_t *cf,
    ngx_array_t *sentinels)
{
    ngx_int_t                            rc;
    ngx_str_t                           *value;
    ngx_uint_t                           i;
    ngx_addr_t                          *addr;
    ngx_mail_smtp_ext_redis_sentinel_t  *st;

    value = cf->args->elts;

    if (sentinels->nalloc == 0) {
        if (ngx_array_init(sentinels, cf->pool, 1,
                           sizeof(ngx_mail_smtp_ext_redis_sentinel_t))
            != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    st = sentinels->elts;

    for (i = 0; i < sentinels->nelts; i++) {
        if (ngx_mail_smtp_ext_redis_str_eq(&st[i].name, &value[1])) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "duplicate Redis sentinel \"%V\"", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    st = ngx_array_push(sentinels);
    if (st == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(st, sizeof(ngx_mail_smtp_ext_redis_sentinel_t));
    st->name = value[1];

    if (ngx_array_init(&st->addrs, cf->pool, cf->args->nelts,
                       sizeof(ngx_addr_t))
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "password=", 9) == 0) {
            st->password.data = value[i].data + 9;
            st->password.len = value[i].len - 9;

            if (st->password.len == 0) {
                goto invalid;
            }

            continue;
        }

        addr = ngx_array_push(&st->addrs);
        if (addr == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_memzero(addr, sizeof(ngx_addr_t));

        rc = ngx_parse_addr_port(cf->pool, addr, value[i].data, value[i].len);

        if (rc == NGX_ERROR) {
            return NGX_CONF_ERROR;
        }

        if (rc == NGX_DECLINED) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid sentinel address \"%V\": use an IP "
                               "address, host names are not resolved",
                               &value[i]);
            return NGX_CONF_ERROR;
        }

        if (ngx_inet_get_port(addr->sockaddr) == 0) {
            ngx_inet_set_port(addr->sockaddr, NGX_MAIL_SMTP_EXT_SENTINEL_PORT);
        }

        addr->name = value[i];
    }

    if (st->addrs.nelts == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "no sentinel address for \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);

    return NGX_CONF_ERROR;
}


char *
ngx_mail_smtp_ext_redis_sentinel_resolve(ngx_conf_t *cf,
    ngx_array_t *servers, ngx_array_t *sentinels)
{
    ngx_uint_t                            i, j;
    ngx_mail_smtp_ext_redis_conf_t      **rcfs;
    ngx_mail_smtp_ext_redis_sentinel_t   *st;

    rcfs = servers->elts;
    st = sentinels->elts;

    for (i = 0; i < servers->nelts; i++) {

        if (rcfs[i]->sentinel_name.len == 0) {
            continue;
        }

        for (j = 0; j < sentinels->nelts; j++) {
            if (ngx_mail_smtp_ext_redis_str_eq(&st[j].name,
                                               &rcfs[i]->sentinel_name))
            {
                rcfs[i]->sentinel = &st[j];
                break;
            }
        }

        if (rcfs[i]->sentinel == NULL) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "unknown Redis sentinel \"%V\" in "
                               "\"smtp_ext_redis %V\": no "
                               "\"smtp_ext_redis_sentinel %V\"",
                               &rcfs[i]->sentinel_name, &rcfs[i]->name,
                               &rcfs[i]->sentinel_name);
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;
}


static ngx_uint_t
ngx_mail_smtp_ext_redis_str_eq(ngx_str_t *a, ngx_str_t *b)
{
    return a->len == b->len
           && (a->len == 0 || ngx_memcmp(a->data, b->data, a->len) == 0);
}


ngx_int_t
ngx_mail_smtp_ext_redis_key(ngx_pool_t *pool,
    ngx_mail_smtp_ext_redis_conf_t *rcf, const char *kind, ngx_str_t *name,
    ngx_uint_t lowcase, ngx_str_t *key)
{
    u_char  *p;
    size_t   klen;

    klen = kind ? ngx_strlen(kind) : 0;

    key->len = rcf->prefix.len + klen + name->len;
    key->data = ngx_pnalloc(pool, key->len + 1);
    if (key->data == NULL) {
        return NGX_ERROR;
    }

    p = ngx_cpymem(key->data, rcf->prefix.data, rcf->prefix.len);
    p = ngx_cpymem(p, kind, klen);

    if (lowcase) {
        ngx_strlow(p, name->data, name->len);
        p += name->len;

    } else {
        p = ngx_cpymem(p, name->data, name->len);
    }

    *p = '\0';

    return NGX_OK;
}


/* process lifetime */

ngx_int_t
ngx_mail_smtp_ext_redis_init_process(ngx_cycle_t *cycle,
    ngx_array_t *servers)
{
    ngx_uint_t                        i, n;
    ngx_mail_smtp_ext_redis_srv_t    *srv;
    ngx_mail_smtp_ext_redis_conf_t  **rcfs;

    ngx_queue_init(&ngx_mail_smtp_ext_redis_reqs);
    ngx_mail_smtp_ext_redis_exiting = 0;
    ngx_mail_smtp_ext_redis_srvs = NULL;
    ngx_mail_smtp_ext_redis_nsrvs = 0;

    if (servers == NULL || servers->nelts == 0) {
        return NGX_OK;
    }

    rcfs = servers->elts;
    n = 0;

    for (i = 0; i < servers->nelts; i++) {
        if (rcfs[i]->index >= n) {
            n = rcfs[i]->index + 1;
        }
    }

    srv = ngx_pcalloc(cycle->pool, n * sizeof(ngx_mail_smtp_ext_redis_srv_t));
    if (srv == NULL) {
        return NGX_ERROR;
    }

    ngx_mail_smtp_ext_redis_srvs = srv;
    ngx_mail_smtp_ext_redis_nsrvs = n;

    for (i = 0; i < servers->nelts; i++) {
        if (srv[rcfs[i]->index].conf == NULL) {
            srv[rcfs[i]->index].conf = rcfs[i];
        }
    }

    for (i = 0; i < n; i++) {
        srv[i].backoff = NGX_MAIL_SMTP_EXT_REDIS_BACKOFF_MIN;

        srv[i].reconnect.handler = ngx_mail_smtp_ext_redis_reconnect_handler;
        srv[i].reconnect.data = &srv[i];
        srv[i].reconnect.log = cycle->log;
        srv[i].reconnect.cancelable = 1;

        srv[i].connect_timer.handler = ngx_mail_smtp_ext_redis_connect_timeout;
        srv[i].connect_timer.data = &srv[i];
        srv[i].connect_timer.log = cycle->log;
        srv[i].connect_timer.cancelable = 1;

        if (srv[i].conf) {
            ngx_mail_smtp_ext_redis_connect(&srv[i]);
        }
    }

    return NGX_OK;
}


void
ngx_mail_smtp_ext_redis_exit_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                      i;
    ngx_queue_t                    *q;
    ngx_mail_smtp_ext_redis_srv_t  *srv;
    ngx_mail_smtp_ext_redis_req_t  *req;

    if (ngx_mail_smtp_ext_redis_srvs == NULL) {
        return;
    }

    /* sessions are not told anything any more */

    ngx_mail_smtp_ext_redis_exiting = 1;

    for (q = ngx_queue_head(&ngx_mail_smtp_ext_redis_reqs);
         q != ngx_queue_sentinel(&ngx_mail_smtp_ext_redis_reqs);
         q = ngx_queue_next(q))
    {
        req = ngx_queue_data(q, ngx_mail_smtp_ext_redis_req_t, queue);

        req->done = 1;

        if (req->cln) {
            req->cln->handler = ngx_mail_smtp_ext_redis_cleanup_unused;
            req->cln = NULL;
        }

        if (req->ev.timer_set) {
            ngx_del_timer(&req->ev);
        }

        if (req->ev.posted) {
            ngx_delete_posted_event(&req->ev);
        }
    }

    for (i = 0; i < ngx_mail_smtp_ext_redis_nsrvs; i++) {
        srv = &ngx_mail_smtp_ext_redis_srvs[i];

        if (srv->reconnect.timer_set) {
            ngx_del_timer(&srv->reconnect);
        }

        if (srv->connect_timer.timer_set) {
            ngx_del_timer(&srv->connect_timer);
        }

        ngx_mail_smtp_ext_sentinel_close(srv);

        if (srv->ac) {
            /* runs the pending callbacks with NULL and our cleanup hook */
            redisAsyncFree(srv->ac);
        }
    }

    while (!ngx_queue_empty(&ngx_mail_smtp_ext_redis_reqs)) {
        q = ngx_queue_head(&ngx_mail_smtp_ext_redis_reqs);
        req = ngx_queue_data(q, ngx_mail_smtp_ext_redis_req_t, queue);

        req->pending = 0;
        ngx_mail_smtp_ext_redis_release(req);
    }

    ngx_mail_smtp_ext_redis_srvs = NULL;
    ngx_mail_smtp_ext_redis_nsrvs = 0;
}


/* connection management */

static void
ngx_mail_smtp_ext_redis_connect(ngx_mail_smtp_ext_redis_srv_t *srv)
{
    int                               rc;
    u_char                            buf[NGX_INT_T_LEN];
    size_t                            argvlen[2];
    const char                       *argv[2];
    ngx_connection_t                 *c;
    redisAsyncContext                *ac;
    ngx_mail_smtp_ext_redis_conf_t   *rcf;

    rcf = srv->conf;

    if (rcf->sentinel) {
        if (!srv->have_master) {
            ngx_mail_smtp_ext_sentinel_ask(srv);
            return;
        }

        /* every later reconnect asks the sentinels first */
        srv->have_master = 0;

        /* checked to be an IP literal when the sentinel named it */
        ac = redisAsyncConnect((const char *) srv->host, srv->port);

    } else if (rcf->unix_path.len) {
        /* IP literals only: hiredis' getaddrinfo() does no DNS lookup */
        ac = redisAsyncConnectUnix((const char *) rcf->unix_path.data);

    } else {
        ac = redisAsyncConnect((const char *) rcf->host.data, rcf->port);
    }

    if (ac == NULL) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "redis %V: cannot allocate context", &rcf->name);
        ngx_mail_smtp_ext_redis_schedule(srv);
        return;
    }

    if (ac->err) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "redis %V: connect failed: %s", &rcf->name, ac->errstr);
        redisAsyncFree(ac);
        ngx_mail_smtp_ext_redis_schedule(srv);
        return;
    }

    c = ngx_get_connection(ac->c.fd, ngx_cycle->log);
    if (c == NULL) {
        redisAsyncFree(ac);
        ngx_mail_smtp_ext_redis_schedule(srv);
        return;
    }

    c->data = srv;
    c->read->handler = ngx_mail_smtp_ext_redis_read_handler;
    c->write->handler = ngx_mail_smtp_ext_redis_write_handler;
    c->read->log = c->log;
    c->write->log = c->log;

    srv->ac = ac;
    srv->conn = c;
    srv->timeouts = 0;
    srv->setup_pending = 0;

    ac->data = srv;

    /*
     * our reply objects: limits checked before memory is spent, and a
     * reply nothing waits for is refused before hiredis asserts on it
     */

    ngx_mail_smtp_ext_redis_reader_init(ac->c.reader, &srv->reader);
    srv->reader.start = ngx_mail_smtp_ext_redis_expected;
    srv->reader.data = srv;

    /* the hooks must be in place before hiredis calls addWrite */

    ac->ev.data = srv;
    ac->ev.addRead = ngx_mail_smtp_ext_redis_add_read;
    ac->ev.delRead = ngx_mail_smtp_ext_redis_del_read;
    ac->ev.addWrite = ngx_mail_smtp_ext_redis_add_write;
    ac->ev.delWrite = ngx_mail_smtp_ext_redis_del_write;
    ac->ev.cleanup = ngx_mail_smtp_ext_redis_cleanup;

    redisAsyncSetConnectCallback(ac, ngx_mail_smtp_ext_redis_on_connect);
    redisAsyncSetDisconnectCallback(ac, ngx_mail_smtp_ext_redis_on_disconnect);

    ngx_log_debug1(NGX_LOG_DEBUG_EVENT, ngx_cycle->log, 0,
                   "redis %V: connecting", &rcf->name);

    /* queued before any query, so they are executed first */

    if (rcf->password.len) {
        argv[0] = "AUTH";
        argvlen[0] = 4;
        argv[1] = (const char *) rcf->password.data;
        argvlen[1] = rcf->password.len;

        rc = redisAsyncCommandArgv(ac, ngx_mail_smtp_ext_redis_setup_handler,
                                   "AUTH", 2, argv, argvlen);
        if (rc != REDIS_OK) {
            goto failed;
        }

        srv->setup_pending++;
    }

    if (rcf->db) {
        argv[0] = "SELECT";
        argvlen[0] = 6;
        argv[1] = (const char *) buf;
        argvlen[1] = ngx_sprintf(buf, "%ui", rcf->db) - buf;

        rc = redisAsyncCommandArgv(ac, ngx_mail_smtp_ext_redis_setup_handler,
                                   "SELECT", 2, argv, argvlen);
        if (rc != REDIS_OK) {
            goto failed;
        }

        srv->setup_pending++;
    }

    if (rcf->sentinel) {
        /* the sentinel may name a replica or a demoted master */
        argv[0] = "ROLE";
        argvlen[0] = 4;

        rc = redisAsyncCommandArgv(ac, ngx_mail_smtp_ext_redis_role_handler,
                                   NULL, 1, argv, argvlen);
        if (rc != REDIS_OK) {
            goto failed;
        }

        srv->setup_pending++;
    }

    ngx_add_timer(&srv->connect_timer, rcf->timeout);

    return;

failed:

    ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                  "redis %V: cannot queue setup commands", &rcf->name);

    /* the cleanup hook schedules the reconnect */
    redisAsyncFree(ac);
}


static void
ngx_mail_smtp_ext_redis_schedule(ngx_mail_smtp_ext_redis_srv_t *srv)
{
    if (ngx_mail_smtp_ext_redis_exiting
        || ngx_exiting || ngx_quit || ngx_terminate)
    {
        return;
    }

    if (srv->reconnect.timer_set) {
        return;
    }

    ngx_log_debug2(NGX_LOG_DEBUG_EVENT, ngx_cycle->log, 0,
                   "redis %V: reconnect in %M ms",
                   &srv->conf->name, srv->backoff);

    ngx_add_timer(&srv->reconnect, srv->backoff);

    srv->backoff *= 2;

    if (srv->backoff > NGX_MAIL_SMTP_EXT_REDIS_BACKOFF_MAX) {
        srv->backoff = NGX_MAIL_SMTP_EXT_REDIS_BACKOFF_MAX;
    }

    /*
     * With sentinels, a failover is seen by polling them: at least every
     * timeout/2, so that mail flows within 2 * timeout + 1s of promotion
     */

    if (srv->conf->sentinel && srv->backoff > srv->conf->timeout / 2) {
        srv->backoff = ngx_max(srv->conf->timeout / 2,
                               NGX_MAIL_SMTP_EXT_REDIS_BACKOFF_MIN / 2);
    }
}


static void
ngx_mail_smtp_ext_redis_reconnect_handler(ngx_event_t *ev)
{
    ngx_mail_smtp_ext_redis_srv_t  *srv;

    srv = ev->data;

    if (srv->ac || srv->peer.connection || ngx_mail_smtp_ext_redis_exiting
        || ngx_exiting || ngx_quit || ngx_terminate)
    {
        return;
    }

    ngx_mail_smtp_ext_redis_connect(srv);
}


static void
ngx_mail_smtp_ext_redis_connect_timeout(ngx_event_t *ev)
{
    ngx_mail_smtp_ext_redis_srv_t  *srv;

    srv = ev->data;

    if (srv->ac == NULL) {
        return;
    }

    ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, NGX_ETIMEDOUT,
                  "redis %V: connect timed out", &srv->conf->name);

    /* not inside hiredis: frees now, the cleanup hook reschedules */
    redisAsyncFree(srv->ac);
}


static void
ngx_mail_smtp_ext_redis_read_handler(ngx_event_t *rev)
{
    redisAsyncContext              *ac;
    ngx_connection_t               *c;
    ngx_mail_smtp_ext_redis_srv_t  *srv;

    c = rev->data;
    srv = c->data;
    ac = srv->ac;

    if (ac == NULL) {
        return;
    }

    if (c->close) {
        /* worker_shutdown_timeout */
        redisAsyncFree(ac);
        return;
    }

    /* may free the context and the connection */
    redisAsyncHandleRead(ac);

    /*
     * Complete replies are gone to their callbacks; what is left is one
     * unfinished item, which hiredis keeps whole however long it grows.
     * Each call reads at most 16K, so this bounds the buffer.
     */

    if (srv->ac == ac
        && !(ac->c.flags & (REDIS_DISCONNECTING|REDIS_FREEING))
        && ngx_mail_smtp_ext_redis_reader_check(ac->c.reader) != 0)
    {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "redis %V: %s, reconnecting", &srv->conf->name,
                      srv->reader.error);

        /* not inside hiredis: frees now, the cleanup hook reschedules */
        redisAsyncFree(ac);
    }
}


static void
ngx_mail_smtp_ext_redis_write_handler(ngx_event_t *wev)
{
    ngx_connection_t               *c;
    ngx_mail_smtp_ext_redis_srv_t  *srv;

    c = wev->data;
    srv = c->data;

    if (srv->ac == NULL) {
        return;
    }

    srv->writing = 1;

    /* may free the context and the connection */
    redisAsyncHandleWrite(srv->ac);

    srv->writing = 0;
}


/*
 * Level-triggered in both directions: hiredis reads at most 16K per call,
 * and epoll keeps one mask per fd, so both directions use the same flags.
 */

static void
ngx_mail_smtp_ext_redis_add_read(void *privdata)
{
    ngx_mail_smtp_ext_redis_srv_t *srv = privdata;

    ngx_connection_t  *c;

    c = srv->conn;

    if (c && !c->read->active) {
        if (ngx_add_event(c->read, NGX_READ_EVENT, NGX_LEVEL_EVENT)
            != NGX_OK)
        {
            ngx_log_error(NGX_LOG_ALERT, c->log, 0,
                          "redis %V: cannot add read event",
                          &srv->conf->name);
        }
    }
}


static void
ngx_mail_smtp_ext_redis_del_read(void *privdata)
{
    ngx_mail_smtp_ext_redis_srv_t *srv = privdata;

    ngx_connection_t  *c;

    c = srv->conn;

    if (c && c->read->active) {
        (void) ngx_del_event(c->read, NGX_READ_EVENT, 0);
    }
}


static void
ngx_mail_smtp_ext_redis_add_write(void *privdata)
{
    ngx_mail_smtp_ext_redis_srv_t *srv = privdata;

    ngx_connection_t  *c;

    c = srv->conn;

    if (c == NULL || c->write->active) {
        return;
    }

    /*
     * A connected context writes the commands of this event cycle in one
     * go after it, without a write event; only a write that did not
     * finish waits for one.
     */

    if (srv->ac && (srv->ac->c.flags & REDIS_CONNECTED) && !srv->writing) {
        if (!c->write->posted) {
            ngx_post_event(c->write, &ngx_posted_events);
        }

        return;
    }

    if (ngx_add_event(c->write, NGX_WRITE_EVENT, NGX_LEVEL_EVENT) != NGX_OK) {
        ngx_log_error(NGX_LOG_ALERT, c->log, 0,
                      "redis %V: cannot add write event", &srv->conf->name);
    }
}


static void
ngx_mail_smtp_ext_redis_del_write(void *privdata)
{
    ngx_mail_smtp_ext_redis_srv_t *srv = privdata;

    ngx_connection_t  *c;

    c = srv->conn;

    if (c && c->write->active) {
        (void) ngx_del_event(c->write, NGX_WRITE_EVENT, 0);
    }
}


/*
 * Called by hiredis on every teardown (failed connect, disconnect,
 * redisAsyncFree) after the pending callbacks and before it closes the fd:
 * release the connection without closing the fd and plan a reconnect.
 */

static void
ngx_mail_smtp_ext_redis_cleanup(void *privdata)
{
    ngx_mail_smtp_ext_redis_srv_t *srv = privdata;

    ngx_connection_t  *c;

    c = srv->conn;

    if (c) {
        if (c->read->active) {
            (void) ngx_del_event(c->read, NGX_READ_EVENT, 0);
        }

        if (c->write->active) {
            (void) ngx_del_event(c->write, NGX_WRITE_EVENT, 0);
        }

        if (c->read->timer_set) {
            ngx_del_timer(c->read);
        }

        if (c->write->timer_set) {
            ngx_del_timer(c->write);
        }

        if (c->read->posted) {
            ngx_delete_posted_event(c->read);
        }

        if (c->write->posted) {
            ngx_delete_posted_event(c->write);
        }

        ngx_free_connection(c);
        c->fd = (ngx_socket_t) -1;
    }

    srv->conn = NULL;
    srv->ac = NULL;
    srv->setup_pending = 0;

    if (srv->connect_timer.timer_set) {
        ngx_del_timer(&srv->connect_timer);
    }

    ngx_mail_smtp_ext_redis_schedule(srv);
}


static void
ngx_mail_smtp_ext_redis_on_connect(const redisAsyncContext *ac, int status)
{
    ngx_mail_smtp_ext_redis_srv_t  *srv;

    srv = ac->data;

    if (status != REDIS_OK) {
        /* hiredis frees the context next; the cleanup hook reschedules */
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "redis %V: connect failed: %s",
                      &srv->conf->name, ac->errstr);
        return;
    }

    if (srv->setup_pending == 0) {
        if (srv->connect_timer.timer_set) {
            ngx_del_timer(&srv->connect_timer);
        }

        srv->backoff = NGX_MAIL_SMTP_EXT_REDIS_BACKOFF_MIN;
    }

    ngx_log_error(NGX_LOG_INFO, ngx_cycle->log, 0,
                  "redis %V: connected", &srv->conf->name);
}


/*
 * Called by our reader when a top-level reply begins: hiredis asserts on
 * a reply that no callback waits for (it takes one for pub/sub), so such
 * a reply fails the reader instead and the connection is dropped.
 */

static int
ngx_mail_smtp_ext_redis_expected(void *data)
{
    ngx_mail_smtp_ext_redis_srv_t *srv = data;

    return srv->ac != NULL && srv->ac->replies.head != NULL;
}


static void
ngx_mail_smtp_ext_redis_on_disconnect(const redisAsyncContext *ac,
    int status)
{
    ngx_mail_smtp_ext_redis_srv_t  *srv;

    srv = ac->data;

    if (status == REDIS_OK) {
        return;
    }

    if (srv->reader.error) {
        /* a limit of our reader, which hiredis reports as no memory */
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "redis %V: %s, reconnecting",
                      &srv->conf->name, srv->reader.error);
        return;
    }

    ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                  "redis %V: connection lost: %s",
                  &srv->conf->name, ac->errstr);
}


static void
ngx_mail_smtp_ext_redis_setup_handler(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                     *reply;
    ngx_mail_smtp_ext_redis_srv_t  *srv;

    reply = r;
    srv = ac->data;

    if (reply == NULL) {
        /* the context is going away */
        return;
    }

    if (reply->type == REDIS_REPLY_ERROR) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "redis %V: %s failed: %*s", &srv->conf->name,
                      (char *) privdata, (size_t) reply->len, reply->str);

        /* deferred by hiredis until this callback returns */
        redisAsyncFree(ac);
        return;
    }

    if (srv->setup_pending && --srv->setup_pending == 0) {
        if (srv->connect_timer.timer_set) {
            ngx_del_timer(&srv->connect_timer);
        }

        srv->backoff = NGX_MAIL_SMTP_EXT_REDIS_BACKOFF_MIN;
    }
}


/*
 * sentinel:NAME (the Sentinel client guidelines): before every connect,
 * ask the sentinels in turn for the master's address; the one that
 * answers is asked first next time.  The master must say it is one
 * (ROLE); a connection error, a failed ROLE check or a -READONLY reply
 * drops the connection, and the reconnect asks again.  While no sentinel
 * names a master, the round is repeated every timeout/2 at most, and
 * lookups fail at once as with a plain Redis that is down.
 */

static void
ngx_mail_smtp_ext_redis_role_handler(redisAsyncContext *ac, void *r,
    void *privdata)
{
    redisReply                     *reply, *role;
    ngx_mail_smtp_ext_redis_srv_t  *srv;

    reply = r;
    srv = ac->data;

    if (reply == NULL) {
        return;
    }

    role = NULL;

    if (reply->type == REDIS_REPLY_ARRAY && reply->elements > 0) {
        role = reply->element[0];
    }

    if (role
        && (role->type == REDIS_REPLY_STRING
            || role->type == REDIS_REPLY_STATUS)
        && role->len == 6 && ngx_strncmp(role->str, "master", 6) == 0)
    {
        ngx_log_error(NGX_LOG_INFO, ngx_cycle->log, 0,
                      "redis %V: using master %V",
                      &srv->conf->name, &srv->master);

        ngx_mail_smtp_ext_redis_setup_handler(ac, r, "ROLE");
        return;
    }

    ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                  "redis %V: %V is not a master (ROLE %*s), "
                  "asking the sentinels", &srv->conf->name, &srv->master,
                  (size_t) (role && role->str ? role->len : 0),
                  role && role->str ? role->str : "");

    /* deferred by hiredis until this callback returns */
    redisAsyncFree(ac);
}


static void
ngx_mail_smtp_ext_sentinel_ask(ngx_mail_smtp_ext_redis_srv_t *srv)
{
    u_char                              *p;
    size_t                               len;
    ngx_int_t                            rc;
    ngx_addr_t                          *addr;
    ngx_connection_t                    *c;
    ngx_mail_smtp_ext_redis_sentinel_t  *st;

    st = srv->conf->sentinel;
    addr = st->addrs.elts;
    addr = &addr[srv->next % st->addrs.nelts];

    ngx_memzero(&srv->peer, sizeof(ngx_peer_connection_t));

    srv->peer.sockaddr = addr->sockaddr;
    srv->peer.socklen = addr->socklen;
    srv->peer.name = &addr->name;
    srv->peer.get = ngx_event_get_peer;
    srv->peer.log = ngx_cycle->log;
    srv->peer.log_error = NGX_ERROR_ERR;

    len = sizeof("*3\r\n$8\r\nSENTINEL\r\n$23\r\nget-master-addr-by-name"
                 "\r\n$\r\n\r\n") - 1 + NGX_SIZE_T_LEN + st->name.len;

    if (st->password.len) {
        len += sizeof("*2\r\n$4\r\nAUTH\r\n$\r\n\r\n") - 1 + NGX_SIZE_T_LEN
               + st->password.len;
    }

    srv->sbuf = ngx_alloc(len, ngx_cycle->log);
    srv->sreader = redisReaderCreate();

    if (srv->sbuf == NULL || srv->sreader == NULL) {
        ngx_mail_smtp_ext_sentinel_failed(srv, "no memory");
        return;
    }

    p = srv->sbuf;

    if (st->password.len) {
        p = ngx_sprintf(p, "*2\r\n$4\r\nAUTH\r\n$%uz\r\n%V\r\n",
                        st->password.len, &st->password);
    }

    p = ngx_sprintf(p, "*3\r\n$8\r\nSENTINEL\r\n$23\r\n"
                    "get-master-addr-by-name\r\n$%uz\r\n%V\r\n",
                    st->name.len, &st->name);

    srv->sout.data = srv->sbuf;
    srv->sout.len = p - srv->sbuf;
    srv->sread = 0;
    srv->sauth = st->password.len ? 1 : 0;

    rc = ngx_event_connect_peer(&srv->peer);

    if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
        srv->peer.connection = NULL;
        ngx_mail_smtp_ext_sentinel_failed(srv, "cannot connect");
        return;
    }

    c = srv->peer.connection;
    c->data = srv;
    c->read->handler = ngx_mail_smtp_ext_sentinel_handler;
    c->write->handler = ngx_mail_smtp_ext_sentinel_handler;

    ngx_add_timer(c->read, srv->conf->timeout);

    if (rc == NGX_OK) {
        ngx_mail_smtp_ext_sentinel_handler(c->write);
    }
}


static void
ngx_mail_smtp_ext_sentinel_handler(ngx_event_t *ev)
{
    ssize_t                         n;
    ngx_int_t                       rc;
    ngx_uint_t                      eof;
    redisReply                     *reply;
    ngx_connection_t               *c;
    ngx_mail_smtp_ext_redis_srv_t  *srv;
    u_char                          buf[512];

    c = ev->data;
    srv = c->data;

    if (ev->timedout) {
        ngx_mail_smtp_ext_sentinel_failed(srv, "timed out");
        return;
    }

    while (srv->sout.len) {
        n = c->send(c, srv->sout.data, srv->sout.len);

        if (n == NGX_ERROR) {
            ngx_mail_smtp_ext_sentinel_failed(srv, "send failed");
            return;
        }

        if (n == NGX_AGAIN) {
            if (ngx_handle_write_event(c->write, 0) != NGX_OK) {
                ngx_mail_smtp_ext_sentinel_failed(srv, "event failed");
            }

            return;
        }

        srv->sout.data += n;
        srv->sout.len -= n;
    }

    eof = 0;

    for ( ;; ) {
        n = c->recv(c, buf, sizeof(buf));

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == 0 || n == NGX_ERROR) {
            /* what came before the close is still an answer */
            eof = 1;
            break;
        }

        /* a sentinel's answer is a few dozen bytes */

        srv->sread += n;

        if (srv->sread > NGX_MAIL_SMTP_EXT_SENTINEL_MAX_REPLY
            || redisReaderFeed(srv->sreader, (const char *) buf, n)
               != REDIS_OK)
        {
            ngx_mail_smtp_ext_sentinel_failed(srv, "reply too long");
            return;
        }
    }

    for ( ;; ) {
        reply = NULL;

        if (redisReaderGetReply(srv->sreader, (void **) &reply) != REDIS_OK) {
            ngx_mail_smtp_ext_sentinel_failed(srv, "invalid reply");
            return;
        }

        if (reply == NULL) {
            break;
        }

        if (srv->sauth) {
            srv->sauth = 0;

            rc = (reply->type == REDIS_REPLY_STATUS) ? NGX_OK : NGX_ERROR;
            freeReplyObject(reply);

            if (rc != NGX_OK) {
                ngx_mail_smtp_ext_sentinel_failed(srv, "AUTH failed");
                return;
            }

            continue;
        }

        rc = ngx_mail_smtp_ext_sentinel_result(srv, reply);
        freeReplyObject(reply);

        if (rc != NGX_OK) {
            ngx_mail_smtp_ext_sentinel_failed(srv, NULL);
            return;
        }

        ngx_mail_smtp_ext_sentinel_close(srv);
        srv->asked = 0;

        ngx_mail_smtp_ext_redis_connect(srv);
        return;
    }

    if (eof) {
        ngx_mail_smtp_ext_sentinel_failed(srv, "connection closed");
        return;
    }

    if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        ngx_mail_smtp_ext_sentinel_failed(srv, "event failed");
    }
}


static ngx_int_t
ngx_mail_smtp_ext_sentinel_result(ngx_mail_smtp_ext_redis_srv_t *srv,
    redisReply *r)
{
    u_char           *p;
    ngx_int_t         port;
    redisReply       *h, *pt;
#if (NGX_HAVE_INET6)
    struct in6_addr   a6;
#endif

    if (r->type == REDIS_REPLY_ERROR) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "redis %V: sentinel %V: %*s", &srv->conf->name,
                      srv->peer.name, (size_t) r->len, r->str);
        return NGX_ERROR;
    }

    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "redis %V: sentinel %V knows no master \"%V\"",
                      &srv->conf->name, srv->peer.name,
                      &srv->conf->sentinel->name);
        return NGX_ERROR;
    }

    h = r->element[0];
    pt = r->element[1];

    if (h->type != REDIS_REPLY_STRING || pt->type != REDIS_REPLY_STRING
        || h->len == 0 || h->len > NGX_SOCKADDR_STRLEN - 8)
    {
        goto invalid;
    }

    /* an IP literal only: hiredis would resolve a name, blocking */

    if (ngx_inet_addr((u_char *) h->str, h->len) == INADDR_NONE
#if (NGX_HAVE_INET6)
        && ngx_inet6_addr((u_char *) h->str, h->len, a6.s6_addr) != NGX_OK
#endif
        )
    {
        goto invalid;
    }

    port = ngx_atoi((u_char *) pt->str, pt->len);

    if (port < 1 || port > 65535) {
        goto invalid;
    }

    p = ngx_cpymem(srv->host, h->str, h->len);
    *p = '\0';
    srv->port = (in_port_t) port;

    p = srv->master_text;

    if (ngx_strlchr((u_char *) h->str, (u_char *) h->str + h->len, ':')) {
        p = ngx_sprintf(p, "[%*s]:%i", (size_t) h->len, h->str, port);

    } else {
        p = ngx_sprintf(p, "%*s:%i", (size_t) h->len, h->str, port);
    }

    srv->master.data = srv->master_text;
    srv->master.len = p - srv->master_text;
    srv->have_master = 1;

    ngx_log_debug3(NGX_LOG_DEBUG_EVENT, ngx_cycle->log, 0,
                   "redis %V: sentinel %V names %V",
                   &srv->conf->name, srv->peer.name, &srv->master);

    return NGX_OK;

invalid:

    ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                  "redis %V: sentinel %V names an invalid address "
                  "(IP literals only)", &srv->conf->name, srv->peer.name);

    return NGX_ERROR;
}


static void
ngx_mail_smtp_ext_sentinel_failed(ngx_mail_smtp_ext_redis_srv_t *srv,
    const char *why)
{
    ngx_mail_smtp_ext_redis_sentinel_t  *st;

    st = srv->conf->sentinel;

    if (why) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "redis %V: sentinel %V: %s", &srv->conf->name,
                      srv->peer.name, why);
    }

    ngx_mail_smtp_ext_sentinel_close(srv);

    srv->next = (srv->next + 1) % st->addrs.nelts;

    if (++srv->asked < st->addrs.nelts
        && !ngx_mail_smtp_ext_redis_exiting)
    {
        ngx_mail_smtp_ext_sentinel_ask(srv);
        return;
    }

    /* a round without an answer: poll again soon */

    srv->asked = 0;

    ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                  "redis %V: no sentinel names a master", &srv->conf->name);

    ngx_mail_smtp_ext_redis_schedule(srv);
}


static void
ngx_mail_smtp_ext_sentinel_close(ngx_mail_smtp_ext_redis_srv_t *srv)
{
    if (srv->peer.connection) {
        ngx_close_connection(srv->peer.connection);
        srv->peer.connection = NULL;
    }

    if (srv->sreader) {
        redisReaderFree(srv->sreader);
        srv->sreader = NULL;
    }

    if (srv->sbuf) {
        ngx_free(srv->sbuf);
        srv->sbuf = NULL;
    }
}


/* queries */

ngx_int_t
ngx_mail_smtp_ext_redis_query(ngx_mail_smtp_ext_redis_conf_t *rcf,
    ngx_pool_t *pool, ngx_mail_smtp_ext_redis_cmd_t *cmds, ngx_uint_t n,
    ngx_mail_smtp_ext_redis_handler_pt handler, void *data)
{
    ngx_uint_t                      i;
    redisAsyncContext              *ac;
    ngx_pool_cleanup_t             *cln;
    ngx_mail_smtp_ext_redis_srv_t  *srv;
    ngx_mail_smtp_ext_redis_req_t  *req;

    if (n == 0 || rcf->index >= ngx_mail_smtp_ext_redis_nsrvs
        || ngx_mail_smtp_ext_redis_exiting)
    {
        return NGX_ERROR;
    }

    srv = &ngx_mail_smtp_ext_redis_srvs[rcf->index];

    cln = ngx_mail_smtp_ext_redis_cleanup_get(pool);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    /* outlives the session until the last hiredis callback */

    req = ngx_calloc(sizeof(ngx_mail_smtp_ext_redis_req_t)
                     + (n - 1) * sizeof(redisReply *), ngx_cycle->log);
    if (req == NULL) {
        return NGX_ERROR;
    }

    req->srv = srv;
    req->handler = handler;
    req->data = data;
    req->n = n;
    req->cln = cln;

    req->ev.handler = ngx_mail_smtp_ext_redis_req_event;
    req->ev.data = req;
    req->ev.log = ngx_cycle->log;

    cln->handler = ngx_mail_smtp_ext_redis_req_cleanup;
    cln->data = req;

    ngx_queue_insert_tail(&ngx_mail_smtp_ext_redis_reqs, &req->queue);

    ac = srv->ac;

    if (ac == NULL
        || (ac->c.flags & (REDIS_DISCONNECTING|REDIS_FREEING)))
    {
        goto fail;
    }

    for (i = 0; i < n; i++) {
        if (redisAsyncCommandArgv(ac, ngx_mail_smtp_ext_redis_cmd_handler,
                                  req, cmds[i].argc, cmds[i].argv,
                                  cmds[i].argvlen)
            != REDIS_OK)
        {
            break;
        }

        req->pending++;
    }

    if (req->pending == 0) {
        goto fail;
    }

    if (i < n) {
        /* the commands already queued will report in; then fail */
        req->failed = 1;
    }

    ngx_add_timer(&req->ev, rcf->timeout);

    return NGX_OK;

fail:

    ngx_log_debug1(NGX_LOG_DEBUG_EVENT, ngx_cycle->log, 0,
                   "redis %V: not connected, query failed", &rcf->name);

    req->fast = 1;
    ngx_post_event(&req->ev, &ngx_posted_events);

    return NGX_OK;
}


static void
ngx_mail_smtp_ext_redis_cmd_handler(redisAsyncContext *ac, void *r,
    void *privdata)
{
    u_char                         *pos;
    ngx_uint_t                      readonly;
    redisReply                     *reply, *copy;
    ngx_mail_smtp_ext_redis_srv_t  *srv;
    ngx_mail_smtp_ext_redis_req_t  *req;

    reply = r;
    req = privdata;
    srv = req->srv;
    readonly = 0;

    req->pending--;

    /* a demoted master answers writes with -READONLY: find the new one */

    if (reply && reply->type == REDIS_REPLY_ERROR && srv->conf->sentinel
        && reply->len >= 8 && ngx_strncmp(reply->str, "READONLY", 8) == 0)
    {
        readonly = 1;
    }

    if (reply == NULL) {
        req->failed = 1;

    } else {
        srv->timeouts = 0;
        srv->backoff = NGX_MAIL_SMTP_EXT_REDIS_BACKOFF_MIN;

        /* hiredis frees the reply when we return: keep a copy */

        if (!req->done && !req->failed && req->received < req->n) {
            copy = ngx_alloc(ngx_mail_smtp_ext_redis_reply_size(reply),
                             ngx_cycle->log);

            if (copy == NULL) {
                req->failed = 1;

            } else {
                pos = (u_char *) copy;
                req->replies[req->received] =
                            ngx_mail_smtp_ext_redis_reply_copy(reply, &pos);
            }
        }
    }

    req->received++;

    if (readonly && srv->ac == ac
        && !(ac->c.flags & (REDIS_DISCONNECTING|REDIS_FREEING)))
    {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "redis %V: %V is read-only now, asking the sentinels",
                      &srv->conf->name, &srv->master);

        /* deferred by hiredis until this callback returns */
        redisAsyncFree(ac);
    }

    if (req->pending) {
        return;
    }

    if (!req->done) {
        ngx_mail_smtp_ext_metric_redis(req->failed ? NGX_SMTP_EXT_M_REDIS_ERROR
                                                   : NGX_SMTP_EXT_M_REDIS_OK);
        ngx_mail_smtp_ext_redis_finish(req, !req->failed);
    }

    ngx_mail_smtp_ext_redis_release(req);
}


static void
ngx_mail_smtp_ext_redis_req_event(ngx_event_t *ev)
{
    ngx_mail_smtp_ext_redis_srv_t  *srv;
    ngx_mail_smtp_ext_redis_req_t  *req;

    req = ev->data;
    srv = req->srv;

    if (req->fast) {
        /* posted: failed before anything was sent */
        ngx_mail_smtp_ext_metric_redis(NGX_SMTP_EXT_M_REDIS_ERROR);
        ngx_mail_smtp_ext_redis_finish(req, 0);
        ngx_mail_smtp_ext_redis_release(req);
        return;
    }

    ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, NGX_ETIMEDOUT,
                  "redis %V: request timed out", &srv->conf->name);

    /* late replies are ignored; the request is freed by the last one */
    ngx_mail_smtp_ext_metric_redis(NGX_SMTP_EXT_M_REDIS_TIMEOUT);
    ngx_mail_smtp_ext_redis_finish(req, 0);

    if (++srv->timeouts >= NGX_MAIL_SMTP_EXT_REDIS_MAX_TIMEOUTS && srv->ac) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "redis %V: %ui requests timed out in a row, "
                      "reconnecting", &srv->conf->name, srv->timeouts);

        srv->timeouts = 0;

        /* not inside hiredis: frees now, the cleanup hook reschedules */
        redisAsyncFree(srv->ac);
    }
}


static void
ngx_mail_smtp_ext_redis_req_cleanup(void *data)
{
    ngx_mail_smtp_ext_redis_req_t  *req = data;

    /* the session is gone: its handler must never be called */

    req->cln = NULL;
    req->done = 1;

    if (req->ev.timer_set) {
        ngx_del_timer(&req->ev);
    }

    if (req->ev.posted) {
        ngx_delete_posted_event(&req->ev);
    }

    ngx_mail_smtp_ext_redis_release(req);
}


/*
 * A finished request leaves its cleanup entry in the session pool; reuse
 * it so that a long session does not grow its pool with every lookup.
 */

static void
ngx_mail_smtp_ext_redis_cleanup_unused(void *data)
{
    /* a finished request */
}


static ngx_pool_cleanup_t *
ngx_mail_smtp_ext_redis_cleanup_get(ngx_pool_t *pool)
{
    ngx_pool_cleanup_t  *cln;

    for (cln = pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_mail_smtp_ext_redis_cleanup_unused) {
            return cln;
        }
    }

    return ngx_pool_cleanup_add(pool, 0);
}


static void
ngx_mail_smtp_ext_redis_finish(ngx_mail_smtp_ext_redis_req_t *req,
    ngx_uint_t ok)
{
    ngx_uint_t  i;

    req->done = 1;

    if (req->ev.timer_set) {
        ngx_del_timer(&req->ev);
    }

    if (req->ev.posted) {
        ngx_delete_posted_event(&req->ev);
    }

    /* the handler may destroy the session pool */

    if (req->cln) {
        req->cln->handler = ngx_mail_smtp_ext_redis_cleanup_unused;
        req->cln = NULL;
    }

    if (ngx_mail_smtp_ext_redis_exiting) {
        return;
    }

    for (i = 0; ok && i < req->n; i++) {
        if (req->replies[i] == NULL) {
            ok = 0;
        }
    }

    req->handler(req->data, ok ? req->replies : NULL, req->n);
}


/* frees the request once hiredis has no more callbacks for it */

static void
ngx_mail_smtp_ext_redis_release(ngx_mail_smtp_ext_redis_req_t *req)
{
    ngx_uint_t  i;

    if (req->pending) {
        return;
    }

    ngx_queue_remove(&req->queue);

    for (i = 0; i < req->n; i++) {
        if (req->replies[i]) {
            ngx_free(req->replies[i]);
        }
    }

    ngx_free(req);
}


/* deep copy of a reply into one block */

#define ngx_mail_smtp_ext_redis_align(n)                                     \
    (((n) + sizeof(long long) - 1) & ~(sizeof(long long) - 1))


static size_t
ngx_mail_smtp_ext_redis_reply_size(redisReply *r)
{
    size_t  size, i;

    size = ngx_mail_smtp_ext_redis_align(sizeof(redisReply));

    if (r->str) {
        size += ngx_mail_smtp_ext_redis_align(r->len + 1);
    }

    if (r->element && r->elements) {
        size += ngx_mail_smtp_ext_redis_align(r->elements
                                              * sizeof(redisReply *));

        for (i = 0; i < r->elements; i++) {
            if (r->element[i]) {
                size += ngx_mail_smtp_ext_redis_reply_size(r->element[i]);
            }
        }
    }

    return size;
}


static redisReply *
ngx_mail_smtp_ext_redis_reply_copy(redisReply *r, u_char **pos)
{
    size_t       i;
    redisReply  *copy;

    copy = (redisReply *) *pos;
    *pos += ngx_mail_smtp_ext_redis_align(sizeof(redisReply));

    ngx_memcpy(copy, r, sizeof(redisReply));

    if (r->str) {
        copy->str = (char *) *pos;
        *pos += ngx_mail_smtp_ext_redis_align(r->len + 1);

        ngx_memcpy(copy->str, r->str, r->len);
        copy->str[r->len] = '\0';
    }

    if (r->element && r->elements) {
        copy->element = (redisReply **) *pos;
        *pos += ngx_mail_smtp_ext_redis_align(r->elements
                                              * sizeof(redisReply *));

        for (i = 0; i < r->elements; i++) {
            copy->element[i] = r->element[i]
                ? ngx_mail_smtp_ext_redis_reply_copy(r->element[i], pos)
                : NULL;
        }

    } else {
        copy->element = NULL;
        copy->elements = 0;
    }

    return copy;
}
