
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * Active SMTP health checks (health_check in smtp_ext_upstream): connect,
 * a 2xx greeting, "EHLO name", a 2xx reply, QUIT.  Every worker runs a
 * timer per pool; the probe of a peer that is due is taken by one worker
 * only, under the zone's lock (hc_owner), so that the node probes each
 * peer once per interval.  A probe runs on the event loop and is bounded
 * by one timer of "timeout" for the whole dialog.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_event_connect.h>
#include <ngx_mail.h>

#include "ngx_mail_smtp_ext_module.h"


#define NGX_MAIL_SMTP_EXT_HC_BUF      2048
#define NGX_MAIL_SMTP_EXT_HC_REASON   256
#define NGX_MAIL_SMTP_EXT_HC_LINE     200     /* of a reply, in the log */


typedef enum {
    ngx_hc_connect = 0,
    ngx_hc_greeting,
    ngx_hc_ehlo,
    ngx_hc_quit
} ngx_mail_smtp_ext_hc_state_e;


typedef struct ngx_mail_smtp_ext_hc_s  ngx_mail_smtp_ext_hc_t;


typedef struct {
    ngx_mail_smtp_ext_hc_t         *hc;
    ngx_mail_smtp_ext_peer_t       *peer;
    ngx_str_t                       label;      /* the peer, in the log */
    ngx_peer_connection_t           pc;
    ngx_mail_smtp_ext_hc_state_e    state;

    ngx_smtp_reply_t                reply;
    u_char                         *start;      /* input buffer */
    u_char                         *last;
    u_char                         *end;

    u_char                         *out;        /* output pending */
    u_char                         *out_last;

    ngx_uint_t                      ok;         /* the EHLO reply was 2xx */
    unsigned                        active:1;
    unsigned                        start_now:1;
} ngx_mail_smtp_ext_hc_probe_t;


/* a pool's checks in this worker: pool->hc */
struct ngx_mail_smtp_ext_hc_s {
    ngx_mail_smtp_ext_pool_t       *pool;
    ngx_event_t                     timer;
    ngx_log_t                      *log;
    ngx_str_t                       ehlo;       /* "EHLO name" CRLF */
    ngx_uint_t                      nprobes;
    ngx_mail_smtp_ext_hc_probe_t   *probes;     /* one per peer */
};


static void ngx_mail_smtp_ext_hc_tick(ngx_event_t *ev);
static void ngx_mail_smtp_ext_hc_start(ngx_mail_smtp_ext_hc_probe_t *pr);
static void ngx_mail_smtp_ext_hc_handler(ngx_event_t *ev);
static void ngx_mail_smtp_ext_hc_run(ngx_mail_smtp_ext_hc_probe_t *pr);
static void ngx_mail_smtp_ext_hc_reply(ngx_mail_smtp_ext_hc_probe_t *pr);
static ngx_int_t ngx_mail_smtp_ext_hc_send(ngx_mail_smtp_ext_hc_probe_t *pr);
static void ngx_mail_smtp_ext_hc_fail_errno(ngx_mail_smtp_ext_hc_probe_t *pr,
    char *what, ngx_err_t err);
static void ngx_mail_smtp_ext_hc_fail_line(ngx_mail_smtp_ext_hc_probe_t *pr,
    char *what);
static void ngx_mail_smtp_ext_hc_done(ngx_mail_smtp_ext_hc_probe_t *pr,
    ngx_uint_t ok, u_char *reason, size_t len);
static void ngx_mail_smtp_ext_hc_abort(ngx_mail_smtp_ext_hc_probe_t *pr);
static void ngx_mail_smtp_ext_hc_close(ngx_mail_smtp_ext_hc_probe_t *pr);


static u_char  ngx_mail_smtp_ext_hc_quit[] = "QUIT" CRLF;


ngx_int_t
ngx_mail_smtp_ext_health_init_process(ngx_cycle_t *cycle,
    ngx_mail_smtp_ext_main_conf_t *smcf)
{
    u_char                        *p;
    ngx_uint_t                     i, j;
    ngx_mail_smtp_ext_hc_t        *hc;
    ngx_mail_smtp_ext_peer_t      *peers;
    ngx_mail_smtp_ext_pool_t      *pool, **pp;
    ngx_mail_smtp_ext_hc_probe_t  *pr;

    pp = smcf->pools.elts;

    for (i = 0; i < smcf->pools.nelts; i++) {
        pool = pp[i];

        if (pool->hc_interval == 0 || pool->shpool == NULL) {
            continue;
        }

        hc = ngx_pcalloc(cycle->pool, sizeof(ngx_mail_smtp_ext_hc_t));
        if (hc == NULL) {
            return NGX_ERROR;
        }

        hc->pool = pool;
        hc->log = cycle->log;
        hc->nprobes = pool->peers.nelts;

        hc->probes = ngx_pcalloc(cycle->pool,
                                 hc->nprobes
                                 * sizeof(ngx_mail_smtp_ext_hc_probe_t));
        if (hc->probes == NULL) {
            return NGX_ERROR;
        }

        hc->ehlo.len = sizeof("EHLO " CRLF) - 1 + pool->hc_ehlo.len;
        hc->ehlo.data = ngx_pnalloc(cycle->pool, hc->ehlo.len);
        if (hc->ehlo.data == NULL) {
            return NGX_ERROR;
        }

        p = ngx_cpymem(hc->ehlo.data, "EHLO ", 5);
        p = ngx_cpymem(p, pool->hc_ehlo.data, pool->hc_ehlo.len);
        *p++ = CR; *p = LF;

        peers = pool->peers.elts;

        for (j = 0; j < hc->nprobes; j++) {
            pr = &hc->probes[j];
            pr->hc = hc;
            pr->peer = &peers[j];

            /* as written; a name of several addresses gets the address */

            pr->label = peers[j].server;

            if (peers[j].server.len != peers[j].name.len
                || ngx_strncmp(peers[j].server.data, peers[j].name.data,
                               peers[j].name.len)
                   != 0)
            {
                pr->label.len = peers[j].server.len + peers[j].name.len + 3;
                pr->label.data = ngx_pnalloc(cycle->pool, pr->label.len);
                if (pr->label.data == NULL) {
                    return NGX_ERROR;
                }

                (void) ngx_sprintf(pr->label.data, "%V (%V)",
                                   &peers[j].server, &peers[j].name);
            }

            pr->start = ngx_pnalloc(cycle->pool, NGX_MAIL_SMTP_EXT_HC_BUF);
            if (pr->start == NULL) {
                return NGX_ERROR;
            }

            pr->end = pr->start + NGX_MAIL_SMTP_EXT_HC_BUF;
        }

        /* cancelable: a worker that is shutting down does not wait for it */

        hc->timer.handler = ngx_mail_smtp_ext_hc_tick;
        hc->timer.data = hc;
        hc->timer.log = cycle->log;
        hc->timer.cancelable = 1;

        pool->hc = hc;

        ngx_add_timer(&hc->timer, 1);
    }

    return NGX_OK;
}


/*
 * Takes the probes that are due and nobody else runs, starts them, and
 * sleeps until the next one is due in the node.
 */

static void
ngx_mail_smtp_ext_hc_tick(ngx_event_t *ev)
{
    ngx_mail_smtp_ext_hc_t *hc = ev->data;

    ngx_uint_t                       i;
    ngx_msec_t                       now, next, due, t, timeout;
    ngx_msec_int_t                   delay;
    ngx_mail_smtp_ext_pool_t        *pool;
    ngx_mail_smtp_ext_peer_t        *peer;
    ngx_mail_smtp_ext_hc_probe_t    *pr;
    ngx_mail_smtp_ext_peer_state_t  *st;

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        return;
    }

    pool = hc->pool;
    timeout = pool->hc_timeout;
    now = ngx_current_msec;
    next = now + pool->hc_interval;

    ngx_mail_smtp_ext_pool_lock(pool);

    for (i = 0; i < hc->nprobes; i++) {
        pr = &hc->probes[i];
        peer = pr->peer;

        if (peer->down) {
            continue;
        }

        st = ngx_mail_smtp_ext_peer_state(peer);

        if (pr->active) {

            /* ours: due again at hc_next, or when it has ended */

            due = st->hc_next;

            if ((ngx_msec_int_t) (due - now) <= 0) {
                due = st->hc_started + timeout + 1;
            }

            if ((ngx_msec_int_t) (due - now) > 0
                && (ngx_msec_int_t) (due - next) < 0)
            {
                next = due;
            }

            continue;
        }

        due = st->hc_next;

        /*
         * A mandatory peer not checked since start or reload is due now;
         * so is one whose time is well beyond an interval away (the
         * interval was shortened by a reload).  The slack covers another
         * worker's fresher clock.
         */

        if ((pool->hc_mandatory
             && st->unhealthy && st->hc_passes == 0 && st->hc_fails == 0)
            || (ngx_msec_int_t) (due - now)
               > (ngx_msec_int_t) (pool->hc_interval + pool->hc_jitter
                                   + 1000))
        {
            due = now;
        }

        if (st->hc_owner && st->hc_owner != ngx_pid) {

            /* another worker's probe, or a dead worker's one to take over */

            t = st->hc_started + 2 * timeout;

            if ((ngx_msec_int_t) (now - t) < 0) {
                if ((ngx_msec_int_t) (due - now) <= 0) {
                    due = st->hc_started + timeout + 1;
                    if ((ngx_msec_int_t) (due - now) <= 0) {
                        due = t;
                    }
                }

                if ((ngx_msec_int_t) (due - next) < 0) {
                    next = due;
                }

                continue;
            }
        }

        if ((ngx_msec_int_t) (due - now) > 0) {
            if ((ngx_msec_int_t) (due - next) < 0) {
                next = due;
            }

            continue;
        }

        st->hc_owner = ngx_pid;
        st->hc_started = now;
        st->hc_next = now + pool->hc_interval;

        if (pool->hc_jitter) {
            st->hc_next += ngx_random() % (pool->hc_jitter + 1);
        }

        if ((ngx_msec_int_t) (st->hc_next - next) < 0) {
            next = st->hc_next;
        }

        pr->start_now = 1;
    }

    ngx_mail_smtp_ext_pool_unlock(pool);

    for (i = 0; i < hc->nprobes; i++) {
        pr = &hc->probes[i];

        if (pr->start_now) {
            pr->start_now = 0;
            ngx_mail_smtp_ext_hc_start(pr);
        }
    }

    delay = (ngx_msec_int_t) (next - now);

    ngx_add_timer(&hc->timer, delay > 0 ? (ngx_msec_t) delay : 1);
}


static void
ngx_mail_smtp_ext_hc_start(ngx_mail_smtp_ext_hc_probe_t *pr)
{
    ngx_int_t                  rc;
    ngx_err_t                  err;
    ngx_connection_t          *c;
    ngx_mail_smtp_ext_hc_t    *hc;
    ngx_mail_smtp_ext_peer_t  *peer;

    hc = pr->hc;
    peer = pr->peer;

    pr->active = 1;
    pr->state = ngx_hc_connect;
    pr->last = pr->start;
    pr->out = NULL;
    pr->out_last = NULL;
    pr->ok = 0;
    ngx_memzero(&pr->reply, sizeof(ngx_smtp_reply_t));

    ngx_memzero(&pr->pc, sizeof(ngx_peer_connection_t));

    pr->pc.sockaddr = peer->sockaddr;
    pr->pc.socklen = peer->socklen;
    pr->pc.name = &peer->name;
    pr->pc.get = ngx_event_get_peer;
    pr->pc.log = hc->log;
    pr->pc.log_error = NGX_ERROR_INFO;

    ngx_set_socket_errno(0);

    rc = ngx_event_connect_peer(&pr->pc);

    if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
        err = ngx_socket_errno;

        if (pr->pc.connection) {
            ngx_close_connection(pr->pc.connection);
            pr->pc.connection = NULL;
        }

        ngx_mail_smtp_ext_hc_fail_errno(pr, "connect()", err);
        return;
    }

    c = pr->pc.connection;

    c->data = pr;
    c->read->handler = ngx_mail_smtp_ext_hc_handler;
    c->write->handler = ngx_mail_smtp_ext_hc_handler;

    /* ngx_close_idle_connections() closes it when the worker shuts down */
    c->idle = 1;

    ngx_add_timer(c->read, hc->pool->hc_timeout);

    if (rc == NGX_OK) {
        pr->state = ngx_hc_greeting;
        ngx_mail_smtp_ext_hc_run(pr);
    }
}


static void
ngx_mail_smtp_ext_hc_handler(ngx_event_t *ev)
{
    int                            err;
    socklen_t                      len;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_hc_probe_t  *pr;

    c = ev->data;
    pr = c->data;

    if (c->close) {
        ngx_mail_smtp_ext_hc_abort(pr);
        return;
    }

    if (ev->timedout) {
        if (pr->state == ngx_hc_quit) {
            /* the check is over, only our QUIT did not get out */
            ngx_mail_smtp_ext_hc_done(pr, pr->ok, NULL, 0);
            return;
        }

        ngx_mail_smtp_ext_hc_done(pr, 0, (u_char *) "timeout",
                                  sizeof("timeout") - 1);
        return;
    }

    if (pr->state == ngx_hc_connect) {
        err = 0;
        len = sizeof(int);

        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, (void *) &err, &len)
            == -1)
        {
            err = ngx_socket_errno;
        }

        if (err) {
            ngx_mail_smtp_ext_hc_fail_errno(pr, "connect()", err);
            return;
        }

        pr->state = ngx_hc_greeting;
    }

    ngx_mail_smtp_ext_hc_run(pr);
}


/* sends what is pending, reads and parses replies while there is input */

static void
ngx_mail_smtp_ext_hc_run(ngx_mail_smtp_ext_hc_probe_t *pr)
{
    size_t             n;
    ssize_t            size;
    ngx_int_t          rc;
    ngx_connection_t  *c;

    c = pr->pc.connection;

    for ( ;; ) {

        if (pr->out != pr->out_last) {
            rc = ngx_mail_smtp_ext_hc_send(pr);

            if (rc == NGX_ERROR) {
                return;
            }

            if (rc == NGX_AGAIN) {
                if (ngx_handle_write_event(c->write, 0) != NGX_OK) {
                    ngx_mail_smtp_ext_hc_done(pr, 0,
                                              (u_char *) "event error",
                                              sizeof("event error") - 1);
                }

                return;
            }

            if (pr->state == ngx_hc_quit) {
                ngx_mail_smtp_ext_hc_done(pr, pr->ok, NULL, 0);
                return;
            }
        }

        size = c->recv(c, pr->last, pr->end - pr->last);

        if (size == NGX_AGAIN) {
            if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
                ngx_mail_smtp_ext_hc_done(pr, 0, (u_char *) "event error",
                                          sizeof("event error") - 1);
            }

            return;
        }

        if (size == NGX_ERROR) {
            ngx_mail_smtp_ext_hc_fail_errno(pr, "recv()", ngx_socket_errno);
            return;
        }

        if (size == 0) {
            ngx_mail_smtp_ext_hc_fail_line(pr,
                pr->state == ngx_hc_greeting
                ? "connection closed before the greeting"
                : "connection closed before the EHLO reply");
            return;
        }

        pr->last += size;

        rc = ngx_smtp_parse_reply(pr->start, pr->last, NGX_SMTP_MAX_LINE,
                                  &pr->reply);

        if (rc == NGX_SMTP_AGAIN) {
            if (pr->last == pr->end) {

                /*
                 * A long multiline reply: drop the lines already seen,
                 * the parser goes on with the next one (same code).
                 */

                n = pr->reply.scanned;
                pr->last = ngx_movemem(pr->start, pr->start + n,
                                       pr->last - pr->start - n);
                pr->reply.scanned = 0;
            }

            continue;
        }

        if (rc == NGX_SMTP_ERROR) {
            ngx_mail_smtp_ext_hc_fail_line(pr,
                pr->state == ngx_hc_greeting ? "invalid greeting"
                                             : "invalid EHLO reply");
            return;
        }

        ngx_mail_smtp_ext_hc_reply(pr);

        if (pr->pc.connection == NULL) {
            return;
        }
    }
}


/* a complete reply at pr->start */

static void
ngx_mail_smtp_ext_hc_reply(ngx_mail_smtp_ext_hc_probe_t *pr)
{
    size_t  len;

    if (pr->state == ngx_hc_greeting) {

        if (pr->reply.code / 100 != 2) {
            ngx_mail_smtp_ext_hc_fail_line(pr, "greeting");
            return;
        }

        /* whatever came after the greeting stays for the next reply */

        len = pr->reply.len;
        pr->last = ngx_movemem(pr->start, pr->start + len,
                               pr->last - pr->start - len);
        ngx_memzero(&pr->reply, sizeof(ngx_smtp_reply_t));

        pr->out = pr->hc->ehlo.data;
        pr->out_last = pr->out + pr->hc->ehlo.len;
        pr->state = ngx_hc_ehlo;
        return;
    }

    /* the EHLO reply decides; QUIT is sent either way */

    pr->ok = (pr->reply.code / 100 == 2);

    pr->out = ngx_mail_smtp_ext_hc_quit;
    pr->out_last = pr->out + sizeof(ngx_mail_smtp_ext_hc_quit) - 1;

    if (!pr->ok) {
        /* the dialog is still in order: end it politely, at most once */
        (void) pr->pc.connection->send(pr->pc.connection, pr->out,
                                       pr->out_last - pr->out);

        ngx_mail_smtp_ext_hc_fail_line(pr, "EHLO reply");
        return;
    }

    pr->state = ngx_hc_quit;
}


static ngx_int_t
ngx_mail_smtp_ext_hc_send(ngx_mail_smtp_ext_hc_probe_t *pr)
{
    ssize_t            n;
    ngx_connection_t  *c;

    c = pr->pc.connection;

    while (pr->out < pr->out_last) {
        n = c->send(c, pr->out, pr->out_last - pr->out);

        if (n == NGX_ERROR) {
            ngx_mail_smtp_ext_hc_fail_errno(pr, "send()", ngx_socket_errno);
            return NGX_ERROR;
        }

        if (n == NGX_AGAIN || n == 0) {
            return NGX_AGAIN;
        }

        pr->out += n;
    }

    return NGX_OK;
}


static void
ngx_mail_smtp_ext_hc_fail_errno(ngx_mail_smtp_ext_hc_probe_t *pr,
    char *what, ngx_err_t err)
{
    u_char  *p, *last;
    u_char   reason[NGX_MAIL_SMTP_EXT_HC_REASON];

    last = reason + sizeof(reason);

    p = ngx_snprintf(reason, sizeof(reason), "%s failed", what);

    if (err && last - p > 16) {
        p = ngx_snprintf(p, last - p - 1, " (%d: ", err);
        p = ngx_strerror(err, p, last - p - 1);
        *p++ = ')';
    }

    ngx_mail_smtp_ext_hc_done(pr, 0, reason, p - reason);
}


/*
 * A failed check whose reason is "what" and, when there is one, the
 * first line of the reply at pr->start, made printable and cut.
 */

static void
ngx_mail_smtp_ext_hc_fail_line(ngx_mail_smtp_ext_hc_probe_t *pr, char *what)
{
    u_char  *p, *s, *end;
    size_t   n;
    u_char   reason[NGX_MAIL_SMTP_EXT_HC_REASON];

    p = ngx_snprintf(reason, sizeof(reason) - NGX_MAIL_SMTP_EXT_HC_LINE - 4,
                     "%s", what);

    s = pr->start;
    end = pr->last;

    if (s < end) {
        *p++ = ' ';

        for (n = 0; s < end && n < NGX_MAIL_SMTP_EXT_HC_LINE; s++, n++) {
            if (*s == CR || *s == LF) {
                break;
            }

            *p++ = (*s < 0x20 || *s >= 0x7f) ? '?' : *s;
        }

        if (n == NGX_MAIL_SMTP_EXT_HC_LINE && s < end && *s != CR) {
            p = ngx_cpymem(p, "...", 3);
        }
    }

    ngx_mail_smtp_ext_hc_done(pr, 0, reason, p - reason);
}


/*
 * The probe is over: QUIT is sent after a completed EHLO reply, then the
 * connection is closed and the verdict recorded under the zone's lock.
 */

static void
ngx_mail_smtp_ext_hc_done(ngx_mail_smtp_ext_hc_probe_t *pr, ngx_uint_t ok,
    u_char *reason, size_t len)
{
    ngx_uint_t                       first, logged, unhealthy;
    ngx_mail_smtp_ext_pool_t        *pool;
    ngx_mail_smtp_ext_peer_state_t  *st;

    pool = pr->hc->pool;

    ngx_mail_smtp_ext_hc_close(pr);

    logged = 0;

    /* the lock first: a reload may have detached this worker's state */

    ngx_mail_smtp_ext_pool_lock(pool);

    st = ngx_mail_smtp_ext_peer_state(pr->peer);

    if (st->hc_owner == ngx_pid) {
        st->hc_owner = 0;
    }

    unhealthy = st->unhealthy;

    if (ok) {
        (void) ngx_atomic_fetch_add(&st->hc_ok, 1);

        /* a mandatory peer's first check since start or reload */
        first = (pool->hc_mandatory && st->hc_passes == 0
                 && st->hc_fails == 0);

        st->hc_fails = 0;
        st->hc_passes++;

        /* a good check ends a passive fail_timeout period too */
        st->fails = 0;

        if (st->unhealthy && (st->hc_passes >= pool->hc_passes || first)) {
            st->unhealthy = 0;
            logged = 1;
        }

    } else {
        (void) ngx_atomic_fetch_add(&st->hc_failed, 1);

        st->hc_passes = 0;
        st->hc_fails++;

        if (st->hc_fails >= pool->hc_fails) {
            st->unhealthy = 1;
        }

        /*
         * Logged when the peer turns unhealthy, and for a mandatory peer
         * also when its first checks fail: it was unhealthy from the start.
         */

        logged = (!unhealthy && st->unhealthy)
                 || (pool->hc_mandatory && unhealthy
                     && st->hc_fails == pool->hc_fails);
    }

    unhealthy = st->unhealthy;

    ngx_mail_smtp_ext_pool_unlock(pool);

    if (!logged) {
        ngx_log_debug5(NGX_LOG_DEBUG_MAIL, pr->hc->log, 0,
                       "smtp_ext: upstream \"%V\" peer %V check %s %*s",
                       &pool->name, &pr->label,
                       ok ? "passed" : "failed:", len, reason);
        return;
    }

    if (unhealthy) {
        ngx_log_error(NGX_LOG_WARN, pr->hc->log, 0,
                      "smtp_ext: upstream \"%V\" peer %V is unhealthy: %*s",
                      &pool->name, &pr->label, len, reason);

    } else {
        ngx_log_error(NGX_LOG_WARN, pr->hc->log, 0,
                      "smtp_ext: upstream \"%V\" peer %V is healthy again",
                      &pool->name, &pr->label);
    }
}


/* the worker shuts down: close the probe, count nothing, free the peer */

static void
ngx_mail_smtp_ext_hc_abort(ngx_mail_smtp_ext_hc_probe_t *pr)
{
    ngx_mail_smtp_ext_pool_t        *pool;
    ngx_mail_smtp_ext_peer_state_t  *st;

    pool = pr->hc->pool;

    ngx_mail_smtp_ext_hc_close(pr);

    ngx_mail_smtp_ext_pool_lock(pool);

    st = ngx_mail_smtp_ext_peer_state(pr->peer);

    if (st->hc_owner == ngx_pid) {
        st->hc_owner = 0;
    }

    ngx_mail_smtp_ext_pool_unlock(pool);
}


static void
ngx_mail_smtp_ext_hc_close(ngx_mail_smtp_ext_hc_probe_t *pr)
{
    if (pr->pc.connection) {
        ngx_close_connection(pr->pc.connection);
        pr->pc.connection = NULL;
    }

    pr->active = 0;
}
