
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * The backend side of a session: connect to a peer of the route's pool
 * (trying the next one on connect, greeting or handshake failure), EHLO,
 * optional STARTTLS and XCLIENT, then MAIL/RCPT/DATA on the session's
 * behalf and the message body with back-pressure.
 *
 * The relay owns at most one pending operation, started by the session
 * (open, RCPT, DATA, a blocked body write, the final dot).  Whatever ends
 * it (a reply, a timeout, a reset, a TLS failure) goes through
 * ngx_mail_smtp_ext_relay_complete(), which calls the session back
 * exactly once.  A failure closes the backend connection at once and
 * marks the relay broken; the structure itself belongs to the session,
 * which frees it with ngx_mail_smtp_ext_relay_close().
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_event_connect.h>
#include <ngx_mail.h>

#include "ngx_mail_smtp_ext_module.h"

#if (NGX_LINUX)
#include <linux/sockios.h>
#endif


typedef enum {
    ngx_relay_connect = 0,
    ngx_relay_greeting,
    ngx_relay_ehlo,
    ngx_relay_helo,
    ngx_relay_starttls,
    ngx_relay_xclient,
    ngx_relay_xehlo,
    ngx_relay_rset,         /* a cached connection taken again */
    ngx_relay_idle,
    ngx_relay_cmds,
    ngx_relay_data,
    ngx_relay_body,
    ngx_relay_dot,
    ngx_relay_chunk         /* BDAT: between two chunks of a message */
} ngx_mail_smtp_ext_relay_state_e;


typedef enum {
    ngx_relay_cmd_rset = 0,
    ngx_relay_cmd_mail,
    ngx_relay_cmd_rcpt
} ngx_mail_smtp_ext_relay_cmd_e;


#define NGX_RELAY_MAX_CMDS   3
#define NGX_RELAY_FAIL_MAX   1024
#define NGX_RELAY_CMD_BUF    4096
/* of a reply too long for the input buffer, the head kept */
#define NGX_RELAY_REPLY_KEEP 2048


struct ngx_mail_smtp_ext_relay_s {
    ngx_mail_session_t                *session;
    ngx_pool_t                        *pool;
    ngx_peer_connection_t              pc;

    ngx_mail_smtp_ext_pool_t          *upstream;
    ngx_mail_smtp_ext_peer_t          *peer;
    ngx_uint_t                         tried;

    ngx_mail_smtp_ext_relay_state_e    state;

    ngx_buf_t                         *in;
    ngx_buf_t                         *out;        /* cmd_out or data_out */
    ngx_buf_t                         *cmd_out;
    ngx_buf_t                          data_out;   /* heap, in DATA only */
    ngx_smtp_reply_t                   reply;
    ngx_smtp_ehlo_t                    ehlo;

    /* commands written or queued, and where the next one starts */
    ngx_mail_smtp_ext_relay_cmd_e      cmds[NGX_RELAY_MAX_CMDS];
    size_t                             cmd_end[NGX_RELAY_MAX_CMDS];
    ngx_uint_t                         ncmds;
    ngx_uint_t                         sent_cmds;
    ngx_uint_t                         done_cmds;

    /* the MAIL reply that a failed RCPT gets, or an early DATA reply */
    u_char                             fail[NGX_RELAY_FAIL_MAX];
    size_t                             fail_len;
    ngx_uint_t                         fail_code;

    ngx_event_t                        fail_ev;

    /* unsent body octets still in the session's input buffer */
    u_char                            *ext_pos;
    u_char                            *ext_last;

    unsigned                           mail_sent:1;
    unsigned                           need_rset:1;
    unsigned                           tls:1;
    unsigned                           handshaked:1;
    unsigned                           broken:1;
    unsigned                           pending:1;  /* the session waits */
    unsigned                           last:1;     /* the dot is queued */
    unsigned                           reply_cut:1;
    unsigned                           reusing:1;
    unsigned                           dsn_warned:1;
    unsigned                           bdat:1;     /* the body as BDAT */
    unsigned                           bdat_last:1;

    size_t                             reply_keep;

    /* the server whose TLS policy made this connection */
    ngx_mail_smtp_ext_srv_conf_t      *sscf;

    ngx_queue_t                        queue;      /* in pool->cache */
};


static ngx_int_t ngx_mail_smtp_ext_relay_connect(
    ngx_mail_smtp_ext_relay_t *r);
static void ngx_mail_smtp_ext_relay_next(ngx_mail_smtp_ext_relay_t *r,
    char *reason);
static void ngx_mail_smtp_ext_relay_close_peer(ngx_mail_smtp_ext_relay_t *r,
    ngx_uint_t failed);
static void ngx_mail_smtp_ext_relay_fail(ngx_mail_smtp_ext_relay_t *r,
    char *reason, ngx_uint_t failed);
static void ngx_mail_smtp_ext_relay_complete(ngx_mail_smtp_ext_relay_t *r,
    ngx_int_t rc, ngx_uint_t code, u_char *p, size_t len);
static void ngx_mail_smtp_ext_relay_data_free(ngx_mail_smtp_ext_relay_t *r);
static ngx_uint_t ngx_mail_smtp_ext_relay_unsent(ngx_connection_t *c);
static void ngx_mail_smtp_ext_relay_no_dsn(ngx_mail_smtp_ext_relay_t *r);
static void ngx_mail_smtp_ext_relay_reset_peer(ngx_connection_t *c);
static ngx_mail_smtp_ext_relay_t *ngx_mail_smtp_ext_relay_cached(
    ngx_mail_session_t *s, ngx_mail_smtp_ext_pool_t *pool);
static void ngx_mail_smtp_ext_relay_set_log(ngx_mail_smtp_ext_relay_t *r,
    ngx_log_t *log);
static ngx_uint_t ngx_mail_smtp_ext_relay_compatible(
    ngx_mail_smtp_ext_relay_t *r, ngx_mail_smtp_ext_srv_conf_t *sscf);
static void ngx_mail_smtp_ext_relay_cache_close(ngx_mail_smtp_ext_relay_t *r,
    ngx_uint_t quit);
static void ngx_mail_smtp_ext_relay_cache_handler(ngx_event_t *ev);
static void ngx_mail_smtp_ext_relay_cache_write(ngx_event_t *ev);
static ngx_int_t ngx_mail_smtp_ext_relay_read_reply(
    ngx_mail_smtp_ext_relay_t *r, ngx_uint_t *code, u_char **p, size_t *len);
static void ngx_mail_smtp_ext_relay_free(ngx_mail_smtp_ext_relay_t *r);
static void ngx_mail_smtp_ext_relay_read_handler(ngx_event_t *rev);
static void ngx_mail_smtp_ext_relay_write_handler(ngx_event_t *wev);
static ngx_int_t ngx_mail_smtp_ext_relay_flush(ngx_mail_smtp_ext_relay_t *r);
static void ngx_mail_smtp_ext_relay_error(ngx_mail_smtp_ext_relay_t *r,
    char *reason);
static void ngx_mail_smtp_ext_relay_error_later(ngx_mail_smtp_ext_relay_t *r);
static void ngx_mail_smtp_ext_relay_error_handler(ngx_event_t *ev);
static void ngx_mail_smtp_ext_relay_reply(ngx_mail_smtp_ext_relay_t *r,
    ngx_uint_t code, u_char *p, size_t len);
static void ngx_mail_smtp_ext_relay_handshake(ngx_mail_smtp_ext_relay_t *r,
    ngx_uint_t code, u_char *p, size_t len);
static void ngx_mail_smtp_ext_relay_after_ehlo(ngx_mail_smtp_ext_relay_t *r);
static void ngx_mail_smtp_ext_relay_command_reply(
    ngx_mail_smtp_ext_relay_t *r, ngx_uint_t code, u_char *p, size_t len);
static void ngx_mail_smtp_ext_relay_ready(ngx_mail_smtp_ext_relay_t *r);
static void ngx_mail_smtp_ext_relay_identify(ngx_mail_smtp_ext_relay_t *r);
static ngx_int_t ngx_mail_smtp_ext_relay_send_line(
    ngx_mail_smtp_ext_relay_t *r, ngx_mail_smtp_ext_relay_state_e state,
    char *fmt, ...);
static ngx_int_t ngx_mail_smtp_ext_relay_xclient(
    ngx_mail_smtp_ext_relay_t *r);
static void ngx_mail_smtp_ext_relay_write_cmds(ngx_mail_smtp_ext_relay_t *r);
#if (NGX_MAIL_SSL)
static void ngx_mail_smtp_ext_relay_starttls(ngx_mail_smtp_ext_relay_t *r);
static void ngx_mail_smtp_ext_relay_ssl_handshaked(ngx_connection_t *c);
#endif


ngx_int_t
ngx_mail_smtp_ext_relay_open(ngx_mail_session_t *s,
    ngx_mail_smtp_ext_pool_t *pool)
{
    ngx_int_t                      rc;
    ngx_pool_t                    *p;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_relay_t     *r;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    /* an idle connection of the pool's cache, made ready for this client */

    r = ngx_mail_smtp_ext_relay_cached(s, pool);

    if (r) {
        ctx->relay = r;
        r->pending = 1;

        sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);
        ngx_add_timer(r->pc.connection->read, sscf->connect_timeout);

        /* a failure is reported later: the next peer is tried then */

        (void) ngx_mail_smtp_ext_relay_send_line(r, ngx_relay_rset,
                                                 "RSET" CRLF);
        return NGX_AGAIN;
    }

    /* the relay has its own pool: it may outlive a transaction */

    p = ngx_create_pool(1024, s->connection->log);
    if (p == NULL) {
        return NGX_ERROR;
    }

    r = ngx_pcalloc(p, sizeof(ngx_mail_smtp_ext_relay_t));
    if (r == NULL) {
        ngx_destroy_pool(p);
        return NGX_ERROR;
    }

    r->session = s;
    r->pool = p;
    r->upstream = pool;
    r->sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    /* the 32 KiB body buffer is taken only in DATA */

    r->in = ngx_create_temp_buf(p, NGX_MAIL_SMTP_EXT_REPLY_BUF);
    r->cmd_out = ngx_create_temp_buf(p, NGX_RELAY_CMD_BUF);

    if (r->in == NULL || r->cmd_out == NULL) {
        ngx_destroy_pool(p);
        return NGX_ERROR;
    }

    r->out = r->cmd_out;

    ctx->relay = r;

    for ( ;; ) {
        rc = ngx_mail_smtp_ext_relay_connect(r);

        if (rc != NGX_BUSY || ngx_queue_empty(&pool->cache)) {
            break;
        }

        /*
         * Idle connections this server cannot take hold the peers'
         * max_conns: the oldest one makes room.
         */

        ngx_mail_smtp_ext_relay_cache_close(
            ngx_queue_data(ngx_queue_last(&pool->cache),
                           ngx_mail_smtp_ext_relay_t, queue), 1);
        r->tried = 0;
    }

    if (rc != NGX_OK) {
        ngx_mail_smtp_ext_relay_free(r);
        return rc;
    }

    r->pending = 1;

    return NGX_AGAIN;
}


/*
 * Starts a connect to the next untried peer: NGX_OK; NGX_BUSY if none is
 * left but some were skipped only for max_conns; NGX_ERROR if none is
 * left.
 */

static ngx_int_t
ngx_mail_smtp_ext_relay_connect(ngx_mail_smtp_ext_relay_t *r)
{
    u_char                        *p;
    ngx_int_t                      rc;
    ngx_uint_t                     busy;
    ngx_connection_t              *c, *cc;
    ngx_mail_session_t            *s;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    s = r->session;
    c = s->connection;
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    for ( ;; ) {

        r->peer = ngx_mail_smtp_ext_get_peer(r->upstream, r->tried, &busy);
        if (r->peer == NULL) {
            if (busy) {
                ngx_log_error(NGX_LOG_WARN, c->log, 0,
                              "smtp_ext: every backend of \"%V\" is at its "
                              "max_conns", &r->upstream->name);
                return NGX_BUSY;
            }

            ngx_log_error(NGX_LOG_ERR, c->log, 0,
                          "smtp_ext: no live backend in \"%V\"",
                          &r->upstream->name);
            return NGX_ERROR;
        }

        r->tried |= (ngx_uint_t) 1
                    << ngx_mail_smtp_ext_peer_index(r->upstream, r->peer);

        ngx_memzero(&r->pc, sizeof(ngx_peer_connection_t));

        r->pc.sockaddr = r->peer->sockaddr;
        r->pc.socklen = r->peer->socklen;
        r->pc.name = &r->peer->name;
        r->pc.get = ngx_event_get_peer;
        r->pc.log = c->log;
        r->pc.log_error = NGX_ERROR_ERR;

        rc = ngx_event_connect_peer(&r->pc);

        if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
            ngx_log_error(NGX_LOG_ERR, c->log, 0,
                          "smtp_ext: connect to backend %V failed",
                          &r->peer->name);

            if (r->pc.connection) {
                ngx_close_connection(r->pc.connection);
                r->pc.connection = NULL;
            }

            ngx_mail_smtp_ext_peer_done(r->upstream, r->peer, 1);
            r->peer = NULL;
            continue;
        }

        break;
    }

    cc = r->pc.connection;

    /* whole commands and the last piece of a message go out at once */

    if (r->pc.sockaddr->sa_family != AF_UNIX) {
        (void) ngx_tcp_nodelay(cc);
    }

    cc->data = r;
    cc->pool = r->pool;
    cc->log = c->log;
    cc->read->log = c->log;
    cc->write->log = c->log;
    cc->read->handler = ngx_mail_smtp_ext_relay_read_handler;
    cc->write->handler = ngx_mail_smtp_ext_relay_write_handler;

    r->in->pos = r->in->start;
    r->in->last = r->in->start;
    r->out = r->cmd_out;
    r->out->pos = r->out->start;
    r->out->last = r->out->start;
    r->reply_cut = 0;
    ngx_memzero(&r->reply, sizeof(ngx_smtp_reply_t));
    ngx_memzero(&r->ehlo, sizeof(ngx_smtp_ehlo_t));
    r->tls = 0;
    r->handshaked = 0;
    r->dsn_warned = 0;
    r->broken = 0;
    r->mail_sent = 0;
    r->need_rset = 0;

    if (sscf->proxy_protocol) {
        p = ngx_proxy_protocol_write(c, r->out->last, r->out->end);
        if (p == NULL) {
            return NGX_ERROR;
        }

        r->out->last = p;
    }

    r->state = ngx_relay_greeting;

    /* connect and greeting together are bounded by connect_timeout */

    ngx_add_timer(cc->read, sscf->connect_timeout);

    if (rc == NGX_OK && r->out->pos != r->out->last) {
        ngx_post_event(cc->write, &ngx_posted_events);
    }

    return NGX_OK;
}


/* the current peer failed before the session saw anything: try another */

static void
ngx_mail_smtp_ext_relay_next(ngx_mail_smtp_ext_relay_t *r, char *reason)
{
    ngx_int_t            rc;
    ngx_mail_session_t  *s;

    s = r->session;

    ngx_log_error(NGX_LOG_ERR, s->connection->log, 0,
                  "smtp_ext: backend %V %s",
                  r->peer ? &r->peer->name : &r->upstream->name, reason);

    ngx_mail_smtp_ext_relay_close_peer(r, !r->reusing);
    r->reusing = 0;

    rc = ngx_mail_smtp_ext_relay_connect(r);

    if (rc == NGX_OK) {
        return;
    }

    r->broken = 1;

    ngx_mail_smtp_ext_relay_complete(r, rc, 451, NULL, 0);
}


static void
ngx_mail_smtp_ext_relay_close_peer(ngx_mail_smtp_ext_relay_t *r,
    ngx_uint_t failed)
{
    /* nothing more is sent, from the session's buffer or ours */
    r->ext_pos = NULL;
    r->ext_last = NULL;
    r->last = 0;

    ngx_mail_smtp_ext_relay_data_free(r);

    if (r->pc.connection) {
#if (NGX_MAIL_SSL)
        if (r->pc.connection->ssl) {
            r->pc.connection->ssl->no_wait_shutdown = 1;
            r->pc.connection->ssl->no_send_shutdown = failed;
            (void) ngx_ssl_shutdown(r->pc.connection);
        }
#endif
        ngx_close_connection(r->pc.connection);
        r->pc.connection = NULL;
    }

    if (r->peer) {
        ngx_mail_smtp_ext_peer_done(r->upstream, r->peer, failed);
        r->peer = NULL;
    }
}


/*
 * A backend failed after the handshake: close it at once, so that it
 * gets nothing more (no final dot in particular), and end the pending
 * operation.  "failed" counts against the peer (max_fails).
 */

static void
ngx_mail_smtp_ext_relay_fail(ngx_mail_smtp_ext_relay_t *r, char *reason,
    ngx_uint_t failed)
{
    ngx_log_error(NGX_LOG_ERR, r->session->connection->log, 0,
                  "smtp_ext: backend %V %s",
                  r->peer ? &r->peer->name : &r->upstream->name, reason);

    ngx_mail_smtp_ext_relay_close_peer(r, failed);
    r->broken = 1;
    r->state = ngx_relay_idle;

    ngx_mail_smtp_ext_relay_complete(r, NGX_ERROR, 451, NULL, 0);
}


/* the one way back to the session: at most once per pending operation */

static void
ngx_mail_smtp_ext_relay_complete(ngx_mail_smtp_ext_relay_t *r, ngx_int_t rc,
    ngx_uint_t code, u_char *p, size_t len)
{
    if (!r->pending) {
        return;
    }

    r->pending = 0;

    /*
     * Nothing more is asked of the backend now: octets it sent after
     * this reply would be taken as the reply to the next command.  The
     * connection goes; the reply at p stays readable (r->in is ours).
     */

    if (rc == NGX_OK && r->pc.connection && r->in->pos != r->in->last) {
        ngx_log_error(NGX_LOG_ERR, r->session->connection->log, 0,
                      "smtp_ext: backend %V sent more than it was asked",
                      &r->peer->name);

        ngx_mail_smtp_ext_relay_close_peer(r, 1);
        r->broken = 1;
        r->state = ngx_relay_idle;
    }

    ngx_mail_smtp_ext_relay_done(r->session, rc, code, p, len);
}


/* octets written but not yet acknowledged by the backend's TCP */

static ngx_uint_t
ngx_mail_smtp_ext_relay_unsent(ngx_connection_t *c)
{
#if defined(SIOCOUTQ)
    int  n;

    if (ioctl(c->fd, SIOCOUTQ, &n) == 0 && n > 0) {
        return 1;
    }
#endif

    return 0;
}


/* the close that follows is a reset: the kernel drops what it holds */

static void
ngx_mail_smtp_ext_relay_reset_peer(ngx_connection_t *c)
{
    struct linger  l;

    l.l_onoff = 1;
    l.l_linger = 0;

    (void) setsockopt(c->fd, SOL_SOCKET, SO_LINGER, (const void *) &l,
                      sizeof(struct linger));
}


static void
ngx_mail_smtp_ext_relay_data_free(ngx_mail_smtp_ext_relay_t *r)
{
    if (r->data_out.start == NULL) {
        return;
    }

    ngx_free(r->data_out.start);
    r->data_out.start = NULL;
    r->out = r->cmd_out;
}


static void
ngx_mail_smtp_ext_relay_free(ngx_mail_smtp_ext_relay_t *r)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    r->pending = 0;

    ngx_mail_smtp_ext_relay_close_peer(r, 0);

    if (r->fail_ev.posted) {
        ngx_delete_posted_event(&r->fail_ev);
    }

    if (r->session) {
        ctx = ngx_mail_get_module_ctx(r->session, ngx_mail_smtp_ext_module);

        if (ctx->relay == r) {
            ctx->relay = NULL;
        }
    }

    ngx_destroy_pool(r->pool);
}


/*
 * keepalive: the end of a transaction gives an idle, healthy backend
 * connection to the pool's per-worker cache instead of keeping it with
 * the client session.  Without keepalive the session keeps it.
 */

void
ngx_mail_smtp_ext_relay_release(ngx_mail_session_t *s)
{
    ngx_queue_t                   *q;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_pool_t      *pool;
    ngx_mail_smtp_ext_relay_t     *r, *old;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);
    r = ctx->relay;

    if (r == NULL || r->upstream->keepalive == 0) {
        return;
    }

    pool = r->upstream;
    c = r->pc.connection;

    if (c == NULL || r->broken || r->pending || !r->handshaked
        || r->state != ngx_relay_idle
        || r->out->pos != r->out->last
        || r->in->pos != r->in->last
        || sscf->proxy_protocol
        || ngx_exiting || ngx_terminate)
    {
        /* after an error, with a PROXY header of this client, or exiting */
        ngx_mail_smtp_ext_relay_close(s, 1);
        return;
    }

    if (pool->cached >= pool->keepalive) {
        q = ngx_queue_last(&pool->cache);
        old = ngx_queue_data(q, ngx_mail_smtp_ext_relay_t, queue);
        ngx_mail_smtp_ext_relay_cache_close(old, 1);
    }

    ctx->relay = NULL;
    r->session = NULL;

    ngx_mail_smtp_ext_relay_set_log(r, ngx_cycle->log);

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    c->read->handler = ngx_mail_smtp_ext_relay_cache_handler;
    c->write->handler = ngx_mail_smtp_ext_relay_cache_write;

    /* nginx closes it at reload; its timer does not keep a worker */
    c->idle = 1;
    c->read->cancelable = 1;
    ngx_add_timer(c->read, pool->keepalive_timeout);

    ngx_queue_insert_head(&pool->cache, &r->queue);
    pool->cached++;

    ngx_log_debug1(NGX_LOG_DEBUG_MAIL, c->log, 0,
                   "smtp_ext: backend %V cached", &r->peer->name);

    if (c->read->ready) {
        ngx_post_event(c->read, &ngx_posted_events);
    }
}


/* the most recently used idle connection to a peer that may take one */

static ngx_mail_smtp_ext_relay_t *
ngx_mail_smtp_ext_relay_cached(ngx_mail_session_t *s,
    ngx_mail_smtp_ext_pool_t *pool)
{
    ngx_queue_t                     *q, *next;
    ngx_connection_t                *c;
    ngx_mail_smtp_ext_relay_t       *r;
    ngx_mail_smtp_ext_srv_conf_t    *sscf;
    ngx_mail_smtp_ext_peer_state_t  *st;

    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    if (sscf->proxy_protocol) {
        /* a PROXY header belongs to a new connection: never a cached one */
        return NULL;
    }

    for (q = ngx_queue_head(&pool->cache);
         q != ngx_queue_sentinel(&pool->cache);
         q = next)
    {
        next = ngx_queue_next(q);

        r = ngx_queue_data(q, ngx_mail_smtp_ext_relay_t, queue);
        st = ngx_mail_smtp_ext_peer_state(r->peer);

        if (r->peer->down || st->unhealthy) {
            ngx_mail_smtp_ext_relay_cache_close(r, 1);
            continue;
        }

        /*
         * Only a server with the same TLS policy towards backends may
         * take it: a connection made without verification never serves
         * a server that asks for it.
         */

        if (!ngx_mail_smtp_ext_relay_compatible(r, sscf)) {
            continue;
        }

        ngx_queue_remove(q);
        pool->cached--;

        c = r->pc.connection;

        if (c->read->timer_set) {
            ngx_del_timer(c->read);
        }

        c->idle = 0;
        c->read->cancelable = 0;
        c->read->handler = ngx_mail_smtp_ext_relay_read_handler;
        c->write->handler = ngx_mail_smtp_ext_relay_write_handler;

        r->session = s;
        r->sscf = sscf;
        ngx_mail_smtp_ext_relay_set_log(r, s->connection->log);

        /* as a new connection, up to "ready" */

        r->reusing = 1;
        r->handshaked = 0;
        r->tried = 0;
        r->mail_sent = 0;
        r->need_rset = 0;
        r->fail_len = 0;
        r->fail_code = 0;

        ngx_log_debug1(NGX_LOG_DEBUG_MAIL, c->log, 0,
                       "smtp_ext: backend %V taken from the cache",
                       &r->peer->name);

        return r;
    }

    return NULL;
}


/*
 * Whether a server may take a connection another server made: the same
 * XCLIENT policy (a server without XCLIENT would not replace the last
 * client's identity), the same STARTTLS policy, and for a connection in
 * TLS the same verification.
 */

static ngx_uint_t
ngx_mail_smtp_ext_relay_compatible(ngx_mail_smtp_ext_relay_t *r,
    ngx_mail_smtp_ext_srv_conf_t *sscf)
{
    ngx_mail_smtp_ext_srv_conf_t  *old;

    old = r->sscf;

    if (old == sscf) {
        return 1;
    }

    if (old->xclient != sscf->xclient
        || old->upstream_tls != sscf->upstream_tls
        || old->upstream_tls_verify != sscf->upstream_tls_verify)
    {
        return 0;
    }

#if (NGX_MAIL_SSL)
    if (r->tls && sscf->upstream_tls_verify
        && old->upstream_ssl != sscf->upstream_ssl)
    {
        /* verified against another trust, or another name */
        return 0;
    }
#endif

    return 1;
}


static void
ngx_mail_smtp_ext_relay_set_log(ngx_mail_smtp_ext_relay_t *r, ngx_log_t *log)
{
    ngx_connection_t  *c;

    c = r->pc.connection;

    r->pool->log = log;
    r->pc.log = log;
    c->log = log;
    c->pool->log = log;
    c->read->log = log;
    c->write->log = log;
}


static void
ngx_mail_smtp_ext_relay_cache_close(ngx_mail_smtp_ext_relay_t *r,
    ngx_uint_t quit)
{
    ngx_connection_t  *c;

    ngx_queue_remove(&r->queue);
    r->upstream->cached--;

    c = r->pc.connection;

    if (quit && c && c->ssl == NULL) {
        (void) c->send(c, (u_char *) "QUIT" CRLF, sizeof("QUIT" CRLF) - 1);
    }

    ngx_mail_smtp_ext_relay_free(r);
}


/*
 * A cached connection: anything the backend sends (its close, a 421) or
 * its idle timeout ends it, and so does a reload or shutdown.
 */

static void
ngx_mail_smtp_ext_relay_cache_handler(ngx_event_t *ev)
{
    u_char                      buf[1];
    ssize_t                     n;
    ngx_connection_t           *c;
    ngx_mail_smtp_ext_relay_t  *r;

    c = ev->data;
    r = c->data;

    if (ev->timedout || c->close) {
        ngx_mail_smtp_ext_relay_cache_close(r, 1);
        return;
    }

    n = c->recv(c, buf, 1);

    if (n == NGX_AGAIN) {
        if (ngx_handle_read_event(ev, 0) != NGX_OK) {
            ngx_mail_smtp_ext_relay_cache_close(r, 0);
        }

        return;
    }

    ngx_log_error(NGX_LOG_INFO, c->log, 0,
                  "smtp_ext: idle backend %V %s", &r->peer->name,
                  n > 0 ? "sent data" : "closed the connection");

    ngx_mail_smtp_ext_relay_cache_close(r, 0);
}


static void
ngx_mail_smtp_ext_relay_cache_write(ngx_event_t *ev)
{
    /* nothing is written to an idle connection */
}


void
ngx_mail_smtp_ext_relay_close(ngx_mail_session_t *s, ngx_uint_t quit)
{
    ngx_connection_t           *c;
    ngx_mail_smtp_ext_ctx_t    *ctx;
    ngx_mail_smtp_ext_relay_t  *r;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    r = ctx->relay;

    if (r == NULL) {
        return;
    }

    c = r->pc.connection;

    /* a polite QUIT, only when nothing else is in flight */

    if (quit && c && r->state == ngx_relay_idle && !r->pending
        && r->out->pos == r->out->last)
    {
        (void) c->send(c, (u_char *) "QUIT" CRLF, sizeof("QUIT" CRLF) - 1);
    }

    ngx_mail_smtp_ext_relay_free(r);
}


ngx_uint_t
ngx_mail_smtp_ext_relay_usable(ngx_mail_session_t *s,
    ngx_mail_smtp_ext_pool_t *pool)
{
    ngx_mail_smtp_ext_ctx_t    *ctx;
    ngx_mail_smtp_ext_relay_t  *r;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    r = ctx->relay;

    /* a peer that turned unhealthy gets no new transaction */

    return r != NULL
           && !r->broken
           && !r->pending
           && r->pc.connection != NULL
           && r->upstream == pool
           && !ngx_mail_smtp_ext_peer_state(r->peer)->unhealthy
           && (r->state == ngx_relay_idle || r->state == ngx_relay_cmds);
}


ngx_str_t *
ngx_mail_smtp_ext_relay_peer_name(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t    *ctx;
    ngx_mail_smtp_ext_relay_t  *r;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    r = ctx->relay;

    if (r == NULL || r->peer == NULL) {
        return NULL;
    }

    return &r->peer->name;
}


static void
ngx_mail_smtp_ext_relay_write_handler(ngx_event_t *wev)
{
    ngx_int_t                   rc;
    ngx_connection_t           *c;
    ngx_mail_smtp_ext_relay_t  *r;

    c = wev->data;
    r = c->data;

    if (wev->timedout) {
        wev->timedout = 0;
        ngx_mail_smtp_ext_relay_error(r, "timed out while sending");
        return;
    }

    rc = ngx_mail_smtp_ext_relay_flush(r);

    if (rc == NGX_ERROR) {
        ngx_mail_smtp_ext_relay_error(r,
                               (!r->handshaked
                                && ngx_socket_errno == NGX_ECONNREFUSED)
                               ? "refused the connection"
                               : "closed the connection");
        return;
    }

    if (rc == NGX_AGAIN || r->state != ngx_relay_body) {
        return;
    }

    /* a blocked body write is done: the dot's reply is due, or more body */

    if (r->last) {
        r->state = ngx_relay_dot;
        return;
    }

    ngx_mail_smtp_ext_relay_complete(r, NGX_OK, 0, NULL, 0);
}


/*
 * Writes what is buffered.  NGX_OK when all is written, NGX_AGAIN when the
 * rest waits for the write event, NGX_ERROR on failure.
 */

static ngx_int_t
ngx_mail_smtp_ext_relay_flush(ngx_mail_smtp_ext_relay_t *r)
{
    u_char                       **pos, *last;
    ssize_t                        n;
    ngx_uint_t                     progress;
    ngx_buf_t                      b;
    ngx_chain_t                    cl[2];
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    c = r->pc.connection;
    progress = 0;

#if (NGX_DEBUG)
    if (r->out == r->cmd_out && r->out->pos < r->out->last) {
        ngx_log_debug3(NGX_LOG_DEBUG_MAIL, c->log, 0,
                       "smtp_ext: to backend %V: %*s",
                       r->peer ? &r->peer->name : &r->upstream->name,
                       r->out->last - r->out->pos, r->out->pos);
    }
#endif

    /*
     * Body octets in the session's input buffer go first: both pieces in
     * one writev() when the relay's own buffer has the rest of the chunk.
     * Not through TLS: its send_chain keeps a partial record buffered,
     * and the plain writes below must not overtake it.
     */

    if (r->ext_pos < r->ext_last && r->out->pos < r->out->last
        && c->ssl == NULL)
    {
        ngx_memzero(&b, sizeof(ngx_buf_t));
        b.start = r->ext_pos;
        b.pos = r->ext_pos;
        b.last = r->ext_last;
        b.end = r->ext_last;
        b.memory = 1;

        cl[0].buf = &b;
        cl[0].next = &cl[1];
        cl[1].buf = r->out;
        cl[1].next = NULL;

        if (c->send_chain(c, cl, 0) == NGX_CHAIN_ERROR) {
            return NGX_ERROR;
        }

        progress = (b.pos != r->ext_pos);
        r->ext_pos = b.pos;
    }

    for ( ;; ) {

        if (r->ext_pos < r->ext_last) {
            pos = &r->ext_pos;
            last = r->ext_last;

        } else if (r->out->pos < r->out->last) {
            pos = &r->out->pos;
            last = r->out->last;

        } else {
            break;
        }

        n = c->send(c, *pos, last - *pos);

        if (n == NGX_ERROR) {
            return NGX_ERROR;
        }

        if (n == NGX_AGAIN || n == 0) {
            sscf = ngx_mail_get_module_srv_conf(r->session,
                                                ngx_mail_smtp_ext_module);

            /* a write that makes no progress is bounded, not a slow one */

            if (r->handshaked && (progress || !c->write->timer_set)) {
                ngx_add_timer(c->write, sscf->upstream_timeout);
            }

            if (ngx_handle_write_event(c->write, 0) != NGX_OK) {
                return NGX_ERROR;
            }

            return NGX_AGAIN;
        }

        *pos += n;
        progress = 1;
    }

    r->ext_pos = NULL;
    r->ext_last = NULL;
    r->out->pos = r->out->start;
    r->out->last = r->out->start;

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    return NGX_OK;
}


static void
ngx_mail_smtp_ext_relay_read_handler(ngx_event_t *rev)
{
    u_char                     *p;
    size_t                      len;
    ngx_int_t                   rc;
    ngx_uint_t                  code;
    ngx_connection_t           *c;
    ngx_mail_smtp_ext_relay_t  *r;

    c = rev->data;
    r = c->data;

    if (rev->timedout) {
        rev->timedout = 0;
        ngx_mail_smtp_ext_relay_error(r, "timed out");
        return;
    }

    rc = ngx_mail_smtp_ext_relay_read_reply(r, &code, &p, &len);

    if (rc == NGX_AGAIN) {
        if (ngx_handle_read_event(rev, 0) != NGX_OK) {
            ngx_mail_smtp_ext_relay_error(r, "failed");
        }

        return;
    }

    if (rc == NGX_ERROR) {
        return;
    }

    if (r->in->pos != r->in->last) {

        if (r->state == ngx_relay_starttls) {
            /* RFC 3207 4.2: nothing sent in plaintext may reach TLS */
            ngx_mail_smtp_ext_relay_next(r,
                                  "sent data after its STARTTLS reply");
            return;
        }

        /* more replies wait: handle them after this one */
        ngx_post_event(rev, &ngx_posted_events);

    } else if (rev->ready
#if (NGX_HAVE_EPOLLRDHUP)
               || rev->pending_eof
#endif
              )
    {
        /*
         * The socket may hold more, or its end: with edge-triggered
         * events nothing would tell us again (a backend that resets
         * right after a reply).
         */
        ngx_post_event(rev, &ngx_posted_events);
    }

    /* the relay may be gone afterwards: touch nothing */

    ngx_mail_smtp_ext_relay_reply(r, code, p, len);
}


/*
 * Reads until one whole reply is in r->in: NGX_OK with the reply at *p
 * (valid until the next read), NGX_AGAIN, or NGX_ERROR when the relay
 * already failed.  Of a reply longer than the buffer the first lines and
 * the final one are kept: its code decides, its text is cut.
 */

static ngx_int_t
ngx_mail_smtp_ext_relay_read_reply(ngx_mail_smtp_ext_relay_t *r,
    ngx_uint_t *code, u_char **p, size_t *len)
{
    int                rc;
    u_char            *final;
    size_t             n, keep;
    ssize_t            size;
    ngx_buf_t         *b;
    ngx_connection_t  *c;

    c = r->pc.connection;
    b = r->in;

    for ( ;; ) {

        if (b->pos < b->last) {

            rc = ngx_smtp_parse_reply(b->pos, b->last, NGX_SMTP_MAX_LINE * 2,
                                      &r->reply);

            if (rc == NGX_SMTP_ERROR) {
                ngx_mail_smtp_ext_relay_error(r, "sent an invalid reply");
                return NGX_ERROR;
            }

            if (rc == NGX_SMTP_OK) {
                *p = b->pos;
                *len = r->reply.len;
                *code = r->reply.code;

                if (r->reply_cut) {
                    /* the head, then the final line: nothing between */

                    for (final = b->pos + *len - 2;
                         final[-1] != LF;
                         final--)
                    {
                        /* void */
                    }

                    n = b->pos + *len - final;

                    if (final > b->pos + r->reply_keep) {
                        ngx_memmove(b->pos + r->reply_keep, final,
                                    b->last - final);
                        b->last -= final - (b->pos + r->reply_keep);
                        *len = r->reply_keep + n;
                    }

                    r->reply_cut = 0;
                    ngx_log_error(NGX_LOG_INFO, c->log, 0,
                                  "smtp_ext: backend %V sent a too long "
                                  "reply, its text is cut",
                                  &r->peer->name);
                }

                ngx_memzero(&r->reply, sizeof(ngx_smtp_reply_t));

                b->pos += *len;

                if (b->pos == b->last) {
                    /* the reply stays readable until the next recv() */
                    b->pos = b->start;
                    b->last = b->start;
                }

                return NGX_OK;
            }

            if (b->pos != b->start) {
                n = b->last - b->pos;
                ngx_memmove(b->start, b->pos, n);
                b->pos = b->start;
                b->last = b->start + n;
            }

            if (r->reply_cut && r->reply.scanned > r->reply_keep) {
                /* past the head of a long reply: drop the lines read */

                n = b->last - (b->pos + r->reply.scanned);
                ngx_memmove(b->pos + r->reply_keep,
                            b->pos + r->reply.scanned, n);
                b->last = b->pos + r->reply_keep + n;
                r->reply.scanned = r->reply_keep;
            }
        }

        if (b->last == b->end) {

            /*
             * A reply longer than the buffer: keep the whole lines of its
             * head, drop the lines after them as they come, up to the
             * final line.  The parser only counts scanned octets.
             */

            keep = r->reply.scanned;

            if (keep > NGX_RELAY_REPLY_KEEP) {
                for (keep = NGX_RELAY_REPLY_KEEP;
                     keep && b->pos[keep - 1] != LF;
                     keep--)
                {
                    /* void */
                }
            }

            if (keep == 0 || keep == r->reply.scanned) {
                ngx_mail_smtp_ext_relay_error(r, "sent a too long reply");
                return NGX_ERROR;
            }

            n = b->last - (b->pos + r->reply.scanned);
            ngx_memmove(b->pos + keep, b->pos + r->reply.scanned, n);
            b->last = b->pos + keep + n;
            r->reply.scanned = keep;
            r->reply_keep = keep;
            r->reply_cut = 1;
        }

        size = c->recv(c, b->last, b->end - b->last);

        if (size == NGX_AGAIN) {
            return NGX_AGAIN;
        }

        if (size == NGX_ERROR || size == 0) {
            ngx_mail_smtp_ext_relay_error(r,
                               (size == NGX_ERROR && !r->handshaked
                                && ngx_socket_errno == NGX_ECONNREFUSED)
                               ? "refused the connection"
                               : "closed the connection");
            return NGX_ERROR;
        }

        b->last += size;
    }
}


/* before the handshake a failure moves on to the next peer */

static void
ngx_mail_smtp_ext_relay_error(ngx_mail_smtp_ext_relay_t *r, char *reason)
{
    if (r->handshaked) {
        ngx_mail_smtp_ext_relay_fail(r, reason, 1);

    } else {
        ngx_mail_smtp_ext_relay_next(r, reason);
    }
}


/* a failure found inside a call from the session is reported later */

static void
ngx_mail_smtp_ext_relay_error_later(ngx_mail_smtp_ext_relay_t *r)
{
    r->fail_ev.handler = ngx_mail_smtp_ext_relay_error_handler;
    r->fail_ev.data = r;
    r->fail_ev.log = r->session->connection->log;

    if (!r->fail_ev.posted) {
        ngx_post_event(&r->fail_ev, &ngx_posted_events);
    }
}


static void
ngx_mail_smtp_ext_relay_error_handler(ngx_event_t *ev)
{
    ngx_mail_smtp_ext_relay_error(ev->data, "closed the connection");
}


static void
ngx_mail_smtp_ext_relay_reply(ngx_mail_smtp_ext_relay_t *r, ngx_uint_t code,
    u_char *p, size_t len)
{
    u_char            *buf;
    ngx_connection_t  *c;

    c = r->pc.connection;

    ngx_log_debug3(NGX_LOG_DEBUG_MAIL, c->log, 0,
                   "smtp_ext: from backend %V: %*s",
                   r->peer ? &r->peer->name : &r->upstream->name, len, p);

    if (!r->handshaked) {
        ngx_mail_smtp_ext_relay_handshake(r, code, p, len);
        return;
    }

    if (r->state == ngx_relay_cmds) {
        ngx_mail_smtp_ext_relay_command_reply(r, code, p, len);
        return;
    }

    switch (r->state) {

    case ngx_relay_data:
        if (c->read->timer_set) {
            ngx_del_timer(c->read);
        }

        if (code != 354) {
            r->state = ngx_relay_idle;
            ngx_mail_smtp_ext_relay_complete(r, NGX_OK, code, p, len);
            return;
        }

        if (r->out->pos != r->out->last) {
            ngx_mail_smtp_ext_relay_fail(r, "replied before DATA was sent",
                                         0);
            return;
        }

        /* the body buffer: from the heap, for this message only */

        buf = ngx_alloc(NGX_MAIL_SMTP_EXT_DATA_BUF, c->log);
        if (buf == NULL) {
            ngx_mail_smtp_ext_relay_fail(r, "has no body buffer", 0);
            return;
        }

        r->data_out.start = buf;
        r->data_out.pos = buf;
        r->data_out.last = buf;
        r->data_out.end = buf + NGX_MAIL_SMTP_EXT_DATA_BUF;
        r->data_out.temporary = 1;
        r->out = &r->data_out;

        r->state = ngx_relay_body;
        ngx_mail_smtp_ext_relay_complete(r, NGX_OK, code, p, len);
        return;

    case ngx_relay_dot:
        if (!ngx_mail_smtp_ext_relay_unsent(c)) {
            goto final;
        }

        /*
         * The dot was written, but the backend's TCP has not even taken
         * all of the message: this reply came before the end of data.
         */

        /* fall through */

    case ngx_relay_body:

        /*
         * A reply while the message, or its final dot, is still being
         * written: the backend gave up.  It gets nothing more (a reset
         * drops what the kernel still holds for it); its own 5xx is kept
         * for the client, who is read to the end of data.
         */

        ngx_mail_smtp_ext_relay_reset_peer(c);

        r->fail_code = (code / 100 == 5) ? code : 0;
        r->fail_len = r->fail_code
                      ? ngx_smtp_shorten_reply(r->fail, NGX_RELAY_FAIL_MAX,
                                               p, len)
                      : 0;

        ngx_mail_smtp_ext_relay_fail(r, "replied during DATA", 0);
        return;

    final:

        if (c->read->timer_set) {
            ngx_del_timer(c->read);
        }

        if (r->bdat && !r->bdat_last) {
            /* a chunk taken: the message goes on with the next one */

            if (code / 100 != 2) {
                r->fail_code = (code / 100 == 5) ? code : 0;
                r->fail_len = r->fail_code
                              ? ngx_smtp_shorten_reply(r->fail,
                                                       NGX_RELAY_FAIL_MAX,
                                                       p, len)
                              : 0;

                ngx_mail_smtp_ext_relay_fail(r, "refused a BDAT chunk", 0);
                return;
            }

            r->state = ngx_relay_chunk;
            r->last = 0;
            ngx_mail_smtp_ext_relay_complete(r, NGX_OK, code, p, len);
            return;
        }

        r->bdat = 0;

        ngx_mail_smtp_ext_relay_data_free(r);

        r->state = ngx_relay_idle;
        r->mail_sent = 0;
        r->last = 0;
        ngx_mail_smtp_ext_relay_complete(r, NGX_OK, code, p, len);
        return;

    default:
        /* a reply nobody asked for: 421 and the like */
        ngx_mail_smtp_ext_relay_fail(r, "sent an unexpected reply", 1);
        return;
    }
}


static void
ngx_mail_smtp_ext_relay_handshake(ngx_mail_smtp_ext_relay_t *r,
    ngx_uint_t code, u_char *p, size_t len)
{
    ngx_mail_session_t            *s;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_core_srv_conf_t      *cscf;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    s = r->session;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    switch (r->state) {

    case ngx_relay_greeting:
        if (code / 100 != 2) {
            ngx_mail_smtp_ext_relay_next(r, "refused the session");
            return;
        }

        (void) ngx_mail_smtp_ext_relay_send_line(r, ngx_relay_ehlo,
                                                 "EHLO %V" CRLF,
                                                 &cscf->server_name);
        return;

    case ngx_relay_ehlo:
        if (code / 100 != 2) {
            (void) ngx_mail_smtp_ext_relay_send_line(r, ngx_relay_helo,
                                                     "HELO %V" CRLF,
                                                     &cscf->server_name);
            return;
        }

        ngx_smtp_parse_ehlo(p, len, &r->ehlo);
        ngx_mail_smtp_ext_relay_after_ehlo(r);
        return;

    case ngx_relay_helo:
        if (code / 100 != 2) {
            ngx_mail_smtp_ext_relay_next(r, "refused HELO");
            return;
        }

        if (sscf->upstream_tls == NGX_MAIL_SMTP_EXT_TLS_REQUIRED) {
            ngx_mail_smtp_ext_relay_next(r, "does not offer STARTTLS");
            return;
        }

        ngx_mail_smtp_ext_relay_ready(r);
        return;

#if (NGX_MAIL_SSL)
    case ngx_relay_starttls:
        if (code != 220) {
            if (sscf->upstream_tls == NGX_MAIL_SMTP_EXT_TLS_REQUIRED) {
                ngx_mail_smtp_ext_relay_next(r, "refused STARTTLS");
                return;
            }

            /* opportunistic: carry on in plaintext */
            r->ehlo.caps &= ~NGX_SMTP_CAP_STARTTLS;
            ngx_mail_smtp_ext_relay_after_ehlo(r);
            return;
        }

        ngx_mail_smtp_ext_relay_starttls(r);
        return;
#endif

    case ngx_relay_rset:
        if (code / 100 != 2) {
            ngx_mail_smtp_ext_relay_next(r, "refused RSET of a cached "
                                            "connection");
            return;
        }

        ngx_mail_smtp_ext_relay_identify(r);
        return;

    case ngx_relay_xclient:
        if (code / 100 != 2) {
            ngx_mail_smtp_ext_relay_next(r, "refused XCLIENT");
            return;
        }

        (void) ngx_mail_smtp_ext_relay_send_line(r, ngx_relay_xehlo,
                                                 "EHLO %*s" CRLF,
                                                 ctx->helo_len, ctx->helo);
        return;

    case ngx_relay_xehlo:
        if (code / 100 != 2) {
            ngx_mail_smtp_ext_relay_next(r, "refused EHLO after XCLIENT");
            return;
        }

        ngx_smtp_parse_ehlo(p, len, &r->ehlo);
        ngx_mail_smtp_ext_relay_ready(r);
        return;

    default:
        ngx_mail_smtp_ext_relay_next(r, "sent an unexpected reply");
        return;
    }
}


/* after EHLO: STARTTLS, XCLIENT, or ready */

static void
ngx_mail_smtp_ext_relay_after_ehlo(ngx_mail_smtp_ext_relay_t *r)
{
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    sscf = ngx_mail_get_module_srv_conf(r->session, ngx_mail_smtp_ext_module);

#if (NGX_MAIL_SSL)
    if (sscf->upstream_tls != NGX_MAIL_SMTP_EXT_TLS_OFF && !r->tls
        && (r->ehlo.caps & NGX_SMTP_CAP_STARTTLS))
    {
        (void) ngx_mail_smtp_ext_relay_send_line(r, ngx_relay_starttls,
                                                 "STARTTLS" CRLF);
        return;
    }
#endif

    if (sscf->upstream_tls == NGX_MAIL_SMTP_EXT_TLS_REQUIRED && !r->tls) {
        ngx_mail_smtp_ext_relay_next(r, "does not offer STARTTLS");
        return;
    }

    ngx_mail_smtp_ext_relay_identify(r);
}


/* XCLIENT for the session's client when the backend lists it, or ready */

static void
ngx_mail_smtp_ext_relay_identify(ngx_mail_smtp_ext_relay_t *r)
{
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    sscf = ngx_mail_get_module_srv_conf(r->session, ngx_mail_smtp_ext_module);

    if (sscf->xclient && (r->ehlo.caps & NGX_SMTP_CAP_XCLIENT)) {
        if (ngx_mail_smtp_ext_relay_xclient(r) != NGX_OK) {
            ngx_mail_smtp_ext_relay_next(r, "XCLIENT failed");
        }

        return;
    }

    ngx_mail_smtp_ext_relay_ready(r);
}


static void
ngx_mail_smtp_ext_relay_ready(ngx_mail_smtp_ext_relay_t *r)
{
    ngx_connection_t  *c;

    c = r->pc.connection;

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    r->handshaked = 1;
    r->reusing = 0;
    r->state = ngx_relay_idle;
    ngx_mail_smtp_ext_peer_ready(r->upstream, r->peer);

    ngx_log_debug1(NGX_LOG_DEBUG_MAIL, c->log, 0,
                   "smtp_ext: backend %V ready", &r->peer->name);

    ngx_mail_smtp_ext_relay_complete(r, NGX_OK, 250, NULL, 0);
}


static ngx_int_t
ngx_mail_smtp_ext_relay_send_line(ngx_mail_smtp_ext_relay_t *r,
    ngx_mail_smtp_ext_relay_state_e state, char *fmt, ...)
{
    va_list                        args;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    va_start(args, fmt);
    r->out->last = ngx_vslprintf(r->out->last, r->out->end, fmt, args);
    va_end(args);

    r->state = state;

    c = r->pc.connection;

    if (r->handshaked) {
        sscf = ngx_mail_get_module_srv_conf(r->session,
                                            ngx_mail_smtp_ext_module);

        if (c->read->timer_set) {
            ngx_del_timer(c->read);
        }

        ngx_add_timer(c->read, sscf->upstream_timeout);
    }

    if (ngx_mail_smtp_ext_relay_flush(r) == NGX_ERROR) {
        ngx_mail_smtp_ext_relay_error_later(r);
        return NGX_ERROR;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_mail_smtp_ext_relay_xclient(ngx_mail_smtp_ext_relay_t *r)
{
    u_char                   *p, *last;
    size_t                    len;
    ngx_uint_t                attrs;
    ngx_str_t                 name;
    ngx_connection_t         *c;
    ngx_mail_session_t       *s;
    ngx_mail_smtp_ext_ctx_t  *ctx;
    u_char                    addr[NGX_SOCKADDR_STRLEN];

    s = r->session;
    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    attrs = r->ehlo.xclient;

    p = r->out->last;
    last = r->out->end;

    /* worst case: every octet of a value becomes "+XX" */

    len = sizeof("XCLIENT" CRLF) - 1
          + sizeof(" ADDR=IPV6:") - 1 + 3 * NGX_SOCKADDR_STRLEN
          + sizeof(" PORT=65535") - 1
          + sizeof(" HELO=") - 1 + 3 * ctx->helo_len
          + sizeof(" NAME=") - 1 + 3 * s->host.len
          + sizeof(" PROTO=ESMTP") - 1
          + sizeof(" LOGIN=") - 1 + 3 * s->login.len;

    if ((size_t) (last - p) < len) {
        return NGX_ERROR;
    }

    p = ngx_cpymem(p, "XCLIENT", sizeof("XCLIENT") - 1);

    if (attrs & NGX_SMTP_XCLIENT_ADDR) {
        len = ngx_sock_ntop(c->sockaddr, c->socklen, addr,
                            NGX_SOCKADDR_STRLEN, 0);

        p = ngx_cpymem(p, " ADDR=", sizeof(" ADDR=") - 1);

#if (NGX_HAVE_INET6)
        if (c->sockaddr->sa_family == AF_INET6) {
            p = ngx_cpymem(p, "IPV6:", sizeof("IPV6:") - 1);
        }
#endif

        p += ngx_smtp_xtext_encode(p, addr, len);
    }

    if (attrs & NGX_SMTP_XCLIENT_PORT) {
        p = ngx_sprintf(p, " PORT=%ui",
                        (ngx_uint_t) ngx_inet_get_port(c->sockaddr));
    }

    /*
     * A connection taken from the cache names every attribute the backend
     * lists: nothing of its last client may stay with it.
     */

    if ((attrs & NGX_SMTP_XCLIENT_HELO) && ctx->helo_len) {
        p = ngx_cpymem(p, " HELO=", sizeof(" HELO=") - 1);
        p += ngx_smtp_xtext_encode(p, ctx->helo, ctx->helo_len);

    } else if ((attrs & NGX_SMTP_XCLIENT_HELO) && r->reusing) {
        p = ngx_cpymem(p, " HELO=[UNAVAILABLE]",
                       sizeof(" HELO=[UNAVAILABLE]") - 1);
    }

    if (attrs & NGX_SMTP_XCLIENT_NAME) {
        name = s->host;

        if (name.len == 0) {
            ngx_str_set(&name, "[UNAVAILABLE]");
        }

        p = ngx_cpymem(p, " NAME=", sizeof(" NAME=") - 1);
        p += ngx_smtp_xtext_encode(p, name.data, name.len);
    }

    if (attrs & NGX_SMTP_XCLIENT_PROTO) {
        p = ngx_sprintf(p, " PROTO=%s", s->esmtp ? "ESMTP" : "SMTP");
    }

    if ((attrs & NGX_SMTP_XCLIENT_LOGIN) && s->login.len) {
        p = ngx_cpymem(p, " LOGIN=", sizeof(" LOGIN=") - 1);
        p += ngx_smtp_xtext_encode(p, s->login.data, s->login.len);

    } else if ((attrs & NGX_SMTP_XCLIENT_LOGIN) && r->reusing) {
        p = ngx_cpymem(p, " LOGIN=[UNAVAILABLE]",
                       sizeof(" LOGIN=[UNAVAILABLE]") - 1);
    }

    *p++ = CR; *p++ = LF;

    r->out->last = p;
    r->state = ngx_relay_xclient;

    if (ngx_mail_smtp_ext_relay_flush(r) == NGX_ERROR) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


#if (NGX_MAIL_SSL)

static void
ngx_mail_smtp_ext_relay_starttls(ngx_mail_smtp_ext_relay_t *r)
{
    ngx_int_t          rc;
    ngx_connection_t  *c;

    c = r->pc.connection;

    /* SSL connection, name, SNI, session: ngx_mail_smtp_ext_upstream_tls.c */

    if (ngx_mail_smtp_ext_upstream_tls_init(r->session, c, r->peer)
        != NGX_OK)
    {
        ngx_mail_smtp_ext_relay_next(r, "TLS setup failed");
        return;
    }

    r->tls = 1;

    rc = ngx_ssl_handshake(c);

    if (rc == NGX_AGAIN) {
        c->ssl->handler = ngx_mail_smtp_ext_relay_ssl_handshaked;
        return;
    }

    ngx_mail_smtp_ext_relay_ssl_handshaked(c);
}


static void
ngx_mail_smtp_ext_relay_ssl_handshaked(ngx_connection_t *c)
{
    char                       *reason;
    ngx_mail_core_srv_conf_t   *cscf;
    ngx_mail_smtp_ext_relay_t  *r;

    r = c->data;

    /*
     * A failed handshake or certificate check is a failed attempt of
     * this peer: never a fall-back to plaintext with it.
     */

    reason = ngx_mail_smtp_ext_upstream_tls_check(r->session, c);

    if (reason) {
        ngx_mail_smtp_ext_relay_next(r, reason);
        return;
    }

    c->read->handler = ngx_mail_smtp_ext_relay_read_handler;
    c->write->handler = ngx_mail_smtp_ext_relay_write_handler;

    cscf = ngx_mail_get_module_srv_conf(r->session, ngx_mail_core_module);

    (void) ngx_mail_smtp_ext_relay_send_line(r, ngx_relay_ehlo,
                                             "EHLO %V" CRLF,
                                             &cscf->server_name);
}

#endif


/* RCPT, preceded by RSET and MAIL as needed: one write with PIPELINING */

void
ngx_mail_smtp_ext_relay_rcpt(ngx_mail_session_t *s, ngx_str_t *rcpt)
{
    ngx_mail_smtp_ext_ctx_t    *ctx;
    ngx_mail_smtp_ext_relay_t  *r;
    u_char                     *p;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    r = ctx->relay;

    r->pending = 1;
    r->ncmds = 0;
    r->sent_cmds = 0;
    r->done_cmds = 0;
    r->fail_len = 0;
    r->fail_code = 0;

    p = r->out->last;

    if (r->need_rset) {
        p = ngx_cpymem(p, "RSET" CRLF, sizeof("RSET" CRLF) - 1);
        r->cmds[r->ncmds] = ngx_relay_cmd_rset;
        r->cmd_end[r->ncmds++] = p - r->out->pos;
        r->need_rset = 0;
    }

    if (!r->mail_sent) {
        p = ngx_cpymem(p, ctx->mail_cmd.data, ctx->mail_cmd.len);

        if (r->ehlo.caps & NGX_SMTP_CAP_SIZE) {
            if (ctx->size >= 0) {
                p = ngx_sprintf(p, " SIZE=%O", ctx->size);
            }
        }

        if (ctx->body8 && (r->ehlo.caps & NGX_SMTP_CAP_8BITMIME)) {
            p = ngx_cpymem(p, " BODY=8BITMIME", sizeof(" BODY=8BITMIME") - 1);
        }

        if (ctx->smtputf8 && (r->ehlo.caps & NGX_SMTP_CAP_SMTPUTF8)) {
            p = ngx_cpymem(p, " SMTPUTF8", sizeof(" SMTPUTF8") - 1);
        }

        if (ctx->mail_dsn.len) {
            if (r->ehlo.caps & NGX_SMTP_CAP_DSN) {
                p = ngx_cpymem(p, ctx->mail_dsn.data, ctx->mail_dsn.len);

            } else {
                ngx_mail_smtp_ext_relay_no_dsn(r);
            }
        }

        *p++ = CR; *p++ = LF;

        r->cmds[r->ncmds] = ngx_relay_cmd_mail;
        r->cmd_end[r->ncmds++] = p - r->out->pos;
        r->mail_sent = 1;
    }

    p = ngx_sprintf(p, "RCPT TO:<%V>", rcpt);

    if (ctx->rcpt_dsn.len) {
        if (r->ehlo.caps & NGX_SMTP_CAP_DSN) {
            p = ngx_cpymem(p, ctx->rcpt_dsn.data, ctx->rcpt_dsn.len);

        } else {
            ngx_mail_smtp_ext_relay_no_dsn(r);
        }
    }

    *p++ = CR; *p++ = LF;
    r->cmds[r->ncmds] = ngx_relay_cmd_rcpt;
    r->cmd_end[r->ncmds++] = p - r->out->pos;

    r->out->last = p;
    r->state = ngx_relay_cmds;

    ngx_mail_smtp_ext_relay_write_cmds(r);
}


static void
ngx_mail_smtp_ext_relay_write_cmds(ngx_mail_smtp_ext_relay_t *r)
{
    size_t                         len;
    ssize_t                        n;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    c = r->pc.connection;
    sscf = ngx_mail_get_module_srv_conf(r->session, ngx_mail_smtp_ext_module);

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    ngx_add_timer(c->read, sscf->upstream_timeout);

    if ((r->ehlo.caps & NGX_SMTP_CAP_PIPELINING)
        || r->sent_cmds + 1 == r->ncmds)
    {
        r->sent_cmds = r->ncmds;

        if (ngx_mail_smtp_ext_relay_flush(r) == NGX_ERROR) {
            ngx_mail_smtp_ext_relay_error_later(r);
        }

        return;
    }

    /* without PIPELINING: one command now, the rest after its reply */

    len = r->cmd_end[r->sent_cmds]
          - (r->sent_cmds ? r->cmd_end[r->sent_cmds - 1] : 0);

    r->sent_cmds++;

    n = c->send(c, r->out->pos, len);

    if (n != (ssize_t) len) {
        /* a short command line does not fill a socket buffer */
        ngx_mail_smtp_ext_relay_error_later(r);
        return;
    }

    r->out->pos += n;
}


static void
ngx_mail_smtp_ext_relay_command_reply(ngx_mail_smtp_ext_relay_t *r,
    ngx_uint_t code, u_char *p, size_t len)
{
    ngx_mail_session_t            *s;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    s = r->session;

    switch (r->cmds[r->done_cmds]) {

    case ngx_relay_cmd_rset:
        break;

    case ngx_relay_cmd_mail:
        if (code / 100 != 2) {
            /* the RCPT that follows gets the backend's MAIL reply */
            r->mail_sent = 0;
            r->fail_len = ngx_smtp_shorten_reply(r->fail, NGX_RELAY_FAIL_MAX,
                                                 p, len);
            r->fail_code = code;
        }

        break;

    case ngx_relay_cmd_rcpt:
        r->state = ngx_relay_idle;

        if (r->pc.connection->read->timer_set) {
            ngx_del_timer(r->pc.connection->read);
        }

        if (r->fail_len) {
            ngx_mail_smtp_ext_relay_complete(r, NGX_OK, r->fail_code,
                                             r->fail, r->fail_len);
            return;
        }

        ngx_mail_smtp_ext_relay_complete(r, NGX_OK, code, p, len);
        return;
    }

    r->done_cmds++;

    if (r->sent_cmds == r->done_cmds) {
        /* without PIPELINING: the next command */
        ngx_mail_smtp_ext_relay_write_cmds(r);
        return;
    }

    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);
    ngx_add_timer(r->pc.connection->read, sscf->upstream_timeout);
}


void
ngx_mail_smtp_ext_relay_data(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t    *ctx;
    ngx_mail_smtp_ext_relay_t  *r;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    r = ctx->relay;

    r->last = 0;
    r->pending = 1;
    r->fail_len = 0;
    r->fail_code = 0;

    (void) ngx_mail_smtp_ext_relay_send_line(r, ngx_relay_data,
                                             "DATA" CRLF);
}


ngx_buf_t *
ngx_mail_smtp_ext_relay_body_buf(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t    *ctx;
    ngx_mail_smtp_ext_relay_t  *r;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    r = ctx->relay;

    if (r == NULL || r->broken || r->state != ngx_relay_body) {
        return NULL;
    }

    return r->out;
}


/*
 * Sends the scanned body in the relay's out buffer.  NGX_OK: all written,
 * read more from the client; NGX_AGAIN: pending, the session waits for
 * ngx_mail_smtp_ext_relay_done() (the body written, or with last the
 * final reply); NGX_ERROR: the backend is gone.
 */

ngx_int_t
ngx_mail_smtp_ext_relay_body(ngx_mail_session_t *s, ngx_uint_t last)
{
    ngx_int_t                      rc;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_relay_t     *r;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    r = ctx->relay;

    if (r == NULL || r->broken || r->pc.connection == NULL
        || r->state != ngx_relay_body)
    {
        return NGX_ERROR;
    }

    c = r->pc.connection;
    r->last = last;

    rc = ngx_mail_smtp_ext_relay_flush(r);

    if (rc == NGX_ERROR) {
        /* nobody waits yet: the session learns it from the return */
        ngx_mail_smtp_ext_relay_fail(r, "closed the connection in DATA", 1);
        return NGX_ERROR;
    }

    if (last) {
        /* the final reply, however long the rest takes to write */

        sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

        if (c->read->timer_set) {
            ngx_del_timer(c->read);
        }

        ngx_add_timer(c->read, sscf->upstream_timeout);

        if (rc == NGX_OK) {
            r->state = ngx_relay_dot;
        }

        r->pending = 1;
        return NGX_AGAIN;
    }

    if (rc == NGX_AGAIN) {
        r->pending = 1;
        return NGX_AGAIN;
    }

    return NGX_OK;
}


/*
 * Body octets that pass unchanged are sent from the session's input
 * buffer, ahead of what the relay's own buffer gets after them, by the
 * next ngx_mail_smtp_ext_relay_body().  The session reads nothing more
 * until they are written.
 */

ngx_int_t
ngx_mail_smtp_ext_relay_body_span(ngx_mail_session_t *s, u_char *p,
    size_t len)
{
    ngx_mail_smtp_ext_ctx_t    *ctx;
    ngx_mail_smtp_ext_relay_t  *r;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    r = ctx->relay;

    if (r == NULL || r->broken || r->pc.connection == NULL
        || r->state != ngx_relay_body
        || r->out->pos != r->out->last || r->ext_pos != r->ext_last)
    {
        return NGX_ERROR;
    }

    r->ext_pos = p;
    r->ext_last = p + len;

    return NGX_OK;
}


ngx_uint_t
ngx_mail_smtp_ext_relay_span_pending(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t    *ctx;
    ngx_mail_smtp_ext_relay_t  *r;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    r = ctx->relay;

    return r != NULL && r->ext_pos != r->ext_last;
}


void
ngx_mail_smtp_ext_relay_reset(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t    *ctx;
    ngx_mail_smtp_ext_relay_t  *r;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    r = ctx->relay;

    if (r == NULL) {
        return;
    }

    if (r->state == ngx_relay_body || r->state == ngx_relay_dot
        || r->state == ngx_relay_data || r->state == ngx_relay_chunk)
    {
        /* a message was started: only closing keeps it from the queue */
        ngx_mail_smtp_ext_relay_free(r);
        return;
    }

    if (r->mail_sent) {
        r->mail_sent = 0;
        r->need_rset = 1;
    }
}


/*
 * BDAT for a backend that lists CHUNKING: the header goes into the body
 * buffer, the session puts the chunk's octets after it and sends them
 * with ngx_mail_smtp_ext_relay_body(), whose "last" awaits the reply to
 * the chunk.  A chunk without LAST leaves the message open (state
 * chunk); a reply then is unexpected and breaks the relay.
 */

ngx_int_t
ngx_mail_smtp_ext_relay_bdat(ngx_mail_session_t *s, off_t size,
    ngx_uint_t last)
{
    u_char                     *buf;
    ngx_mail_smtp_ext_ctx_t    *ctx;
    ngx_mail_smtp_ext_relay_t  *r;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    r = ctx->relay;

    if (r == NULL || r->broken || r->pc.connection == NULL || r->pending
        || !r->mail_sent
        || (r->state != ngx_relay_idle && r->state != ngx_relay_chunk)
        || r->out->pos != r->out->last)
    {
        return NGX_ERROR;
    }

    if (r->data_out.start == NULL) {
        buf = ngx_alloc(NGX_MAIL_SMTP_EXT_DATA_BUF, s->connection->log);
        if (buf == NULL) {
            return NGX_ERROR;
        }

        r->data_out.start = buf;
        r->data_out.pos = buf;
        r->data_out.last = buf;
        r->data_out.end = buf + NGX_MAIL_SMTP_EXT_DATA_BUF;
        r->data_out.temporary = 1;
        r->out = &r->data_out;
    }

    r->out->last = ngx_sprintf(r->out->last, "BDAT %O%s" CRLF, size,
                               last ? " LAST" : "");

    r->bdat = 1;
    r->bdat_last = last;
    r->last = 0;
    r->fail_len = 0;
    r->fail_code = 0;
    r->state = ngx_relay_body;

    return NGX_OK;
}


/* the reply a backend gave up DATA with, if it was a 5xx */

ngx_uint_t
ngx_mail_smtp_ext_relay_early_reply(ngx_mail_session_t *s, u_char **p,
    size_t *len)
{
    ngx_mail_smtp_ext_ctx_t    *ctx;
    ngx_mail_smtp_ext_relay_t  *r;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    r = ctx->relay;

    if (r == NULL || !r->broken || r->fail_code == 0 || r->fail_len == 0) {
        return 0;
    }

    *p = r->fail;
    *len = r->fail_len;

    return r->fail_code;
}


/* the EHLO keywords of the session's backend */

ngx_uint_t
ngx_mail_smtp_ext_relay_caps(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t    *ctx;
    ngx_mail_smtp_ext_relay_t  *r;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    r = ctx->relay;

    return r ? r->ehlo.caps : 0;
}


/* DSN parameters are dropped for a backend that does not list DSN */

static void
ngx_mail_smtp_ext_relay_no_dsn(ngx_mail_smtp_ext_relay_t *r)
{
    if (r->dsn_warned) {
        return;
    }

    r->dsn_warned = 1;

    ngx_log_error(NGX_LOG_WARN, r->session->connection->log, 0,
                  "smtp_ext: backend %V does not list DSN, DSN parameters "
                  "dropped", &r->peer->name);
}
