
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * The client side of a session: greeting, command loop with pipelining,
 * replies, STARTTLS, the transaction and the DATA stream.  Backend steps
 * are delegated to the relay and come back in ngx_mail_smtp_ext_relay_done.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>
#if (NGX_MAIL_SSL)
#include <ngx_mail_ssl_module.h>
#endif

#include "ngx_mail_smtp_ext_module.h"
#include "ngx_mail_smtp_ext_edge.h"


/* the backend step the session waits for */
#define NGX_SMTP_EXT_STEP_OPEN    1
#define NGX_SMTP_EXT_STEP_RCPT    2
#define NGX_SMTP_EXT_STEP_LOOKUP  5

/* how long input is drained after the last reply */
#define NGX_SMTP_EXT_LINGER       2000

/* a backend reply larger than the reply buffer goes through this one */
#define NGX_SMTP_EXT_BIG_OUT      8192


#define ngx_smtp_ext_reply(s)     ngx_string(s CRLF)

static ngx_str_t  ngx_smtp_ext_ok = ngx_smtp_ext_reply("250 2.0.0 Ok");
static ngx_str_t  ngx_smtp_ext_mail_ok = ngx_smtp_ext_reply("250 2.1.0 Ok");
static ngx_str_t  ngx_smtp_ext_bye = ngx_smtp_ext_reply("221 2.0.0 Bye");
static ngx_str_t  ngx_smtp_ext_vrfy = ngx_smtp_ext_reply(
    "252 2.0.0 Cannot VRFY user, but will accept message and attempt "
    "delivery");
static ngx_str_t  ngx_smtp_ext_help = ngx_smtp_ext_reply(
    "214 2.0.0 https://www.rfc-editor.org/rfc/rfc5321");
static ngx_str_t  ngx_smtp_ext_tls_ready = ngx_smtp_ext_reply(
    "220 2.0.0 Ready to start TLS");
static ngx_str_t  ngx_smtp_ext_unknown = ngx_smtp_ext_reply(
    "500 5.5.2 Error: command not recognized");
static ngx_str_t  ngx_smtp_ext_too_long = ngx_smtp_ext_reply(
    "500 5.5.6 Line too long");
static ngx_str_t  ngx_smtp_ext_syntax = ngx_smtp_ext_reply(
    "501 5.5.4 Syntax error in parameters or arguments");
static ngx_str_t  ngx_smtp_ext_not_impl = ngx_smtp_ext_reply(
    "502 5.5.1 Command not supported");
static ngx_str_t  ngx_smtp_ext_no_auth = ngx_smtp_ext_reply(
    "503 5.5.1 Error: authentication not enabled");
static ngx_str_t  ngx_smtp_ext_need_helo = ngx_smtp_ext_reply(
    "503 5.5.1 Send HELO/EHLO first");
static ngx_str_t  ngx_smtp_ext_nested = ngx_smtp_ext_reply(
    "503 5.5.1 Nested MAIL command");
static ngx_str_t  ngx_smtp_ext_need_mail = ngx_smtp_ext_reply(
    "503 5.5.1 Need MAIL before RCPT");
static ngx_str_t  ngx_smtp_ext_need_mail_data = ngx_smtp_ext_reply(
    "503 5.5.1 Need MAIL before DATA");
static ngx_str_t  ngx_smtp_ext_after_bdat = ngx_smtp_ext_reply(
    "503 5.5.1 Error: BDAT transaction under way, send RSET");
static ngx_str_t  ngx_smtp_ext_in_tls = ngx_smtp_ext_reply(
    "503 5.5.1 Already in TLS");
static ngx_str_t  ngx_smtp_ext_need_tls = ngx_smtp_ext_reply(
    "530 5.7.0 Must issue a STARTTLS command first");
static ngx_str_t  ngx_smtp_ext_need_auth = ngx_smtp_ext_reply(
    "530 5.7.0 Authentication required");
static ngx_str_t  ngx_smtp_ext_no_rcpts = ngx_smtp_ext_reply(
    "554 5.5.1 No valid recipients");
static ngx_str_t  ngx_smtp_ext_param = ngx_smtp_ext_reply(
    "555 5.5.4 Unsupported option");
static ngx_str_t  ngx_smtp_ext_utf8 = ngx_smtp_ext_reply(
    "553 5.6.7 Must declare SMTPUTF8 to send UTF-8 address");
static ngx_str_t  ngx_smtp_ext_no_utf8 = ngx_smtp_ext_reply(
    "553 5.6.7 Recipient's server does not support SMTPUTF8");
static ngx_str_t  ngx_smtp_ext_no_8bit = ngx_smtp_ext_reply(
    "554 5.6.9 Recipient's server does not support 8BITMIME");
static ngx_str_t  ngx_smtp_ext_too_big = ngx_smtp_ext_reply(
    "552 5.3.4 Message size exceeds fixed maximum message size");
static ngx_str_t  ngx_smtp_ext_too_many = ngx_smtp_ext_reply(
    "452 4.5.3 Too many recipients");
static ngx_str_t  ngx_smtp_ext_elsewhere = ngx_smtp_ext_reply(
    "452 4.5.3 Recipient routed elsewhere, send it in a new transaction");
static ngx_str_t  ngx_smtp_ext_no_backend = ngx_smtp_ext_reply(
    "451 4.4.1 No backend available, try again later");
static ngx_str_t  ngx_smtp_ext_bdat_size = ngx_smtp_ext_reply(
    "421 4.5.4 BDAT chunk size unknown, closing connection");
static ngx_str_t  ngx_smtp_ext_busy = ngx_smtp_ext_reply(
    "451 4.4.5 Backends busy, try again later");
ngx_str_t  ngx_mail_smtp_ext_lost_reply = ngx_smtp_ext_reply(
    "451 4.4.2 Backend connection lost, try again later");
static ngx_str_t  ngx_smtp_ext_shutdown = ngx_smtp_ext_reply(
    "421 4.3.2 Service shutting down");
ngx_str_t  ngx_mail_smtp_ext_error_reply = ngx_smtp_ext_reply(
    "451 4.3.0 Internal server error");


static void ngx_mail_smtp_ext_run(ngx_mail_session_t *s);
static ngx_int_t ngx_mail_smtp_ext_read(ngx_mail_session_t *s);
static ngx_int_t ngx_mail_smtp_ext_command(ngx_mail_session_t *s);
static ngx_int_t ngx_mail_smtp_ext_execute(ngx_mail_session_t *s,
    u_char *line, size_t len);
static ngx_int_t ngx_mail_smtp_ext_helo(ngx_mail_session_t *s,
    ngx_smtp_cmd_t *cmd);
static ngx_int_t ngx_mail_smtp_ext_mail(ngx_mail_session_t *s,
    ngx_smtp_cmd_t *cmd);
static ngx_int_t ngx_mail_smtp_ext_rcpt(ngx_mail_session_t *s,
    ngx_smtp_cmd_t *cmd);
static ngx_int_t ngx_mail_smtp_ext_data(ngx_mail_session_t *s);
static ngx_int_t ngx_mail_smtp_ext_starttls(ngx_mail_session_t *s);
static void ngx_mail_smtp_ext_log_tx(ngx_mail_session_t *s);
static ngx_int_t ngx_mail_smtp_ext_rcpt_relay(ngx_mail_session_t *s);
static ngx_int_t ngx_mail_smtp_ext_rcpt_send(ngx_mail_session_t *s);
static void ngx_mail_smtp_ext_write_handler(ngx_event_t *wev);
static void ngx_mail_smtp_ext_close(ngx_mail_session_t *s,
    ngx_str_t *reply);
static void ngx_mail_smtp_ext_cleanup(void *data);
static void ngx_mail_smtp_ext_read_timer(ngx_mail_session_t *s);
static void ngx_mail_smtp_ext_linger(ngx_mail_session_t *s);
static void ngx_mail_smtp_ext_linger_handler(ngx_event_t *ev);
static ngx_uint_t ngx_mail_smtp_ext_client_gone(ngx_mail_session_t *s);


void
ngx_mail_smtp_ext_init_session(ngx_mail_session_t *s, ngx_connection_t *c)
{
    u_char                        *p;
    ngx_buf_t                     *b;
    ngx_pool_cleanup_t            *cln;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_core_srv_conf_t      *cscf;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    ctx = ngx_pcalloc(c->pool, sizeof(ngx_mail_smtp_ext_ctx_t));
    if (ctx == NULL) {
        ngx_mail_close_connection(c);
        return;
    }

    ngx_mail_set_ctx(s, ctx, ngx_mail_smtp_ext_module);

    ctx->session = s;
    ctx->size = -1;

    ngx_mail_smtp_ext_metric_session(s);

    /* one allocation for commands and replies: idle sessions stay small */

    p = ngx_pnalloc(c->pool, NGX_MAIL_SMTP_EXT_CMD_BUF + sscf->out_size);
    cln = ngx_pool_cleanup_add(c->pool, 0);

    if (p == NULL || cln == NULL) {
        ngx_mail_close_connection(c);
        return;
    }

    b = &ctx->cmd_buf;
    b->start = p;
    b->pos = p;
    b->last = p;
    b->end = p + NGX_MAIL_SMTP_EXT_CMD_BUF;
    b->temporary = 1;
    s->buffer = b;

    b = &ctx->out_buf;
    b->start = p + NGX_MAIL_SMTP_EXT_CMD_BUF;
    b->pos = b->start;
    b->last = b->start;
    b->end = b->start + sscf->out_size;
    b->temporary = 1;
    ctx->out = b;

    cln->handler = ngx_mail_smtp_ext_cleanup;
    cln->data = s;

    c->log->action = "in smtp_ext session";

    c->read->handler = ngx_mail_smtp_ext_auth_state;
    c->write->handler = ngx_mail_smtp_ext_write_handler;

    /* replies are whole: no reason to wait for the client's ACK */

    if (c->sockaddr->sa_family != AF_UNIX) {
        (void) ngx_tcp_nodelay(c);
    }

    ngx_add_timer(c->read, cscf->timeout);

    if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        ngx_mail_close_connection(c);
        return;
    }

    /* with a resolver the greeting waits for the client's name */

    ctx->state = ngx_smtp_ext_wait;

    /* edge protection (SPEC §10): may refuse, or hold the greeting back */

    if (ngx_mail_smtp_ext_edge_start(s) != NGX_OK) {
        return;
    }

    switch (ngx_mail_smtp_ext_resolve(s)) {

    case NGX_OK:
        return;

    case NGX_DECLINED:
        ngx_mail_smtp_ext_greet(s);
        return;

    default:
        ngx_mail_close_connection(c);
        return;
    }
}


void
ngx_mail_smtp_ext_greet(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    /* edge protection (SPEC §10): it greets later, or never */

    if (ngx_mail_smtp_ext_edge_hold(s)) {
        return;
    }

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    ctx->state = ngx_smtp_ext_cmd;

    (void) ngx_mail_smtp_ext_reply(s, &sscf->greeting);

    ngx_mail_smtp_ext_run(s);
}


/* after a STARTTLS handshake: a new session on the same connection */

void
ngx_mail_smtp_ext_init_protocol(ngx_event_t *rev)
{
    ngx_connection_t         *c;
    ngx_mail_session_t       *s;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    c = rev->data;
    s = c->data;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    c->log->action = "in smtp_ext session";

    c->read->handler = ngx_mail_smtp_ext_auth_state;
    c->write->handler = ngx_mail_smtp_ext_write_handler;

    ctx->state = ngx_smtp_ext_cmd;
    ctx->greeted = 0;
    ctx->helo_len = 0;
    s->esmtp = 0;

    s->buffer->pos = s->buffer->start;
    s->buffer->last = s->buffer->start;

    ngx_mail_smtp_ext_metric_session(s);

    ngx_mail_smtp_ext_run(s);
}


void
ngx_mail_smtp_ext_auth_state(ngx_event_t *rev)
{
    ngx_connection_t              *c;
    ngx_mail_session_t            *s;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    c = rev->data;
    s = c->data;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (rev->timedout) {
        rev->timedout = 0;
        c->timedout = 1;

        ngx_log_error(NGX_LOG_INFO, c->log, NGX_ETIMEDOUT,
                      "client timed out");

        if (ctx->state == ngx_smtp_ext_data
            || ctx->step == NGX_MAIL_SMTP_EXT_STEP_BODY
            || ctx->step == NGX_MAIL_SMTP_EXT_STEP_DOT)
        {
            /* the message stays unfinished at the backend */
            ngx_mail_smtp_ext_relay_close(s, 0);
        }

        sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);
        ngx_mail_smtp_ext_close(s, &sscf->timed_out);
        return;
    }

    if (c->close) {
        /* reload or shutdown: an idle backend connection gets its QUIT */
        ngx_mail_smtp_ext_relay_close(s, ctx->state == ngx_smtp_ext_cmd
                                         && !ctx->in_tx);
        ngx_mail_smtp_ext_close(s, &ngx_smtp_ext_shutdown);
        return;
    }

    ngx_mail_smtp_ext_run(s);
}


/* NGX_SMTP_EXT parse_command hook: the core never calls it for us */

ngx_int_t
ngx_mail_smtp_ext_parse_command(ngx_mail_session_t *s)
{
    return NGX_MAIL_PARSE_INVALID_COMMAND;
}


/*
 * The session's engine: executes buffered commands in order, streams
 * DATA, reads when it needs input, and stops while a backend step is
 * pending or the client does not take our replies.
 */

static void
ngx_mail_smtp_ext_run(ngx_mail_session_t *s)
{
    ngx_int_t                      rc;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    for ( ;; ) {

        if (ctx->out_blocked) {
            return;
        }

        switch (ctx->state) {

        case ngx_smtp_ext_cmd:
        case ngx_smtp_ext_auth_line:

            if ((size_t) (ctx->out->end - ctx->out->last) < sscf->max_reply)
            {
                rc = ngx_mail_smtp_ext_flush(s);

                if (rc == NGX_DONE) {
                    return;
                }

                if (rc == NGX_AGAIN) {
                    return;
                }
            }

            rc = ngx_mail_smtp_ext_command(s);
            break;

        case ngx_smtp_ext_data:
            rc = ctx->in_chunk ? ngx_mail_smtp_ext_bdat_body(s)
                               : ngx_mail_smtp_ext_data_body(s);
            break;

        default:
            rc = NGX_AGAIN;
            break;
        }

        if (rc == NGX_DONE) {
            return;
        }

        if (rc == NGX_OK) {
            continue;
        }

        /* NGX_AGAIN: wait for input, a backend or the client */

        c->idle = 0;

        if (ctx->state == ngx_smtp_ext_cmd
            || ctx->state == ngx_smtp_ext_auth_line
            || ctx->state == ngx_smtp_ext_data)
        {
            if (ctx->state == ngx_smtp_ext_cmd && !ctx->in_tx
                && (ngx_exiting || ngx_terminate))
            {
                /* reload or shutdown: no transaction is cut off */
                ngx_mail_smtp_ext_relay_close(s, 1);
                ngx_mail_smtp_ext_close(s, &ngx_smtp_ext_shutdown);
                return;
            }

            rc = ngx_mail_smtp_ext_read(s);

            if (rc == NGX_DONE) {
                return;
            }

            if (rc == NGX_OK) {
                continue;
            }

            /*
             * A command line's deadline runs from its first octet (see
             * ngx_mail_smtp_ext_read()); with no partial line the idle
             * timeout starts now.
             */

            if (!c->read->timer_set
                || (ctx->state != ngx_smtp_ext_data
                    && s->buffer->pos == s->buffer->last))
            {
                ngx_mail_smtp_ext_read_timer(s);
            }

            /* nginx closes idle connections at reload and shutdown */
            c->idle = (ctx->state == ngx_smtp_ext_cmd && !ctx->in_tx);

        } else if (ctx->state == ngx_smtp_ext_wait
                   && ngx_mail_smtp_ext_client_gone(s))
        {
            /* whatever the session waits for, a client that left ends it */
            ngx_log_error(NGX_LOG_INFO, c->log, 0,
                          "client closed the connection while waiting");
            ngx_mail_smtp_ext_relay_close(s, 0);
            ngx_mail_smtp_ext_close(s, NULL);
            return;
        }

        if (ngx_mail_smtp_ext_flush(s) == NGX_DONE) {
            return;
        }

        if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
            ngx_mail_smtp_ext_close(s, NULL);
        }

        return;
    }
}


/* NGX_OK: new input; NGX_AGAIN: none yet; NGX_DONE: session closed */

static ngx_int_t
ngx_mail_smtp_ext_read(ngx_mail_session_t *s)
{
    size_t                     len;
    ssize_t                    n;
    ngx_buf_t                 *b;
    ngx_connection_t          *c;
    ngx_mail_smtp_ext_ctx_t   *ctx;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (ctx->state == ngx_smtp_ext_cmd) {
        ngx_mail_smtp_ext_data_buffer_release(s);
    }

    b = s->buffer;

    if (ngx_mail_smtp_ext_relay_span_pending(s)) {
        /* the backend still sends from this buffer: it must not move */
        return NGX_AGAIN;
    }

    len = b->last - b->pos;

    if (b->pos == b->last) {
        b->pos = b->start;
        b->last = b->start;

    } else if (b->pos != b->start) {
        len = b->last - b->pos;
        ngx_memmove(b->start, b->pos, len);
        b->pos = b->start;
        b->last = b->start + len;
    }

    if (b->last == b->end) {
        /* cannot happen: a full buffer always holds a command */
        return NGX_AGAIN;
    }

    if (!c->read->ready
#if (NGX_HAVE_EPOLLRDHUP)
        && !c->read->pending_eof
#endif
       )
    {
        return NGX_AGAIN;
    }

    n = c->recv(c, b->last, b->end - b->last);

    if (n == NGX_AGAIN) {
        return NGX_AGAIN;
    }

    if (n == NGX_ERROR || n == 0) {

        if (ctx->state == ngx_smtp_ext_data) {
            ngx_log_error(NGX_LOG_INFO, c->log, 0,
                          "client closed the connection in DATA");

            /* the backend must never see an end of this message */
            ngx_mail_smtp_ext_relay_close(s, 0);
        }

        ngx_mail_smtp_ext_close(s, NULL);
        return NGX_DONE;
    }

    b->last += n;

    /*
     * Slow clients: a command line has "timeout" from its first octet,
     * not from each read (as Postfix's smtpd_per_record_deadline); DATA
     * has a deadline that grows with the octets received.
     */

    if (ctx->state == ngx_smtp_ext_data || ctx->skip) {
        ctx->data_in += n;
        ngx_mail_smtp_ext_read_timer(s);

    } else if (len == 0 || !c->read->timer_set) {
        ngx_mail_smtp_ext_read_timer(s);
    }

    return NGX_OK;
}


/*
 * While a step is pending the client's input stays where it is (it is
 * the next command, or data); only its end is looked for, without
 * reading.  Under TLS the end is found when the step is over.
 */

static ngx_uint_t
ngx_mail_smtp_ext_client_gone(ngx_mail_session_t *s)
{
    u_char             buf[1];
    ssize_t            n;
    ngx_err_t          err;
    ngx_connection_t  *c;

    c = s->connection;

    if (!c->read->ready || c->ssl) {
        return 0;
    }

    n = recv(c->fd, buf, 1, MSG_PEEK);

    if (n > 0) {
        return 0;
    }

    if (n == 0) {
        return 1;
    }

    err = ngx_socket_errno;

    if (err == NGX_EAGAIN || err == NGX_EINTR) {
        c->read->ready = 0;
        return 0;
    }

    return 1;
}


/*
 * Arms the client's read timer: "timeout" for a command line or between
 * commands; in DATA the rest of "timeout" plus the octets received at
 * smtp_ext_min_data_rate since the 354, and never more than "timeout"
 * for one read.
 */

static void
ngx_mail_smtp_ext_read_timer(ngx_mail_session_t *s)
{
    ngx_msec_t                     timer;
    ngx_msec_int_t                 left;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_core_srv_conf_t      *cscf;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    timer = cscf->timeout;

    if ((ctx->state == ngx_smtp_ext_data || ctx->skip)
        && sscf->min_data_rate)
    {
        left = (ngx_msec_int_t) (ctx->data_start + cscf->timeout
                                 + ctx->data_in * 1000
                                   / (off_t) sscf->min_data_rate
                                 - ngx_current_msec);

        if (left <= 0) {
            left = 1;
        }

        timer = ngx_min(timer, (ngx_msec_t) left);
    }

    ngx_add_timer(c->read, timer);
}


/* executes one buffered command line; NGX_AGAIN if none is complete */

static ngx_int_t
ngx_mail_smtp_ext_command(ngx_mail_session_t *s)
{
    int                       rc;
    off_t                     n;
    ngx_buf_t                *b;
    ngx_smtp_line_t           line;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    b = s->buffer;

    if (ctx->skip) {
        /* a refused BDAT's chunk is data, never commands (RFC 3030) */

        n = ngx_min((off_t) (b->last - b->pos), ctx->skip);
        b->pos += n;
        ctx->skip -= n;

        if (ctx->skip) {
            return NGX_AGAIN;
        }
    }

    if (ctx->skip_line) {
        /* the rest of an overlong line: drop it up to its LF */

        rc = ngx_smtp_find_line(b->pos, b->last, b->last - b->pos + 1,
                                &line);
        if (rc == NGX_SMTP_AGAIN) {
            b->pos = b->last;
            return NGX_AGAIN;
        }

        b->pos += line.consumed;
        ctx->skip_line = 0;

        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_too_long);
    }

    rc = ngx_smtp_find_line(b->pos, b->last, NGX_SMTP_MAX_LINE, &line);

    if (rc == NGX_SMTP_AGAIN) {
        return NGX_AGAIN;
    }

    if (rc == NGX_SMTP_LINE_TOO_LONG) {
        b->pos += line.consumed;

        if (ctx->state == ngx_smtp_ext_auth_line) {
            /* the exchange is over: nothing of it may stay */
            ngx_mail_smtp_ext_auth_reset(s);
        }

        ctx->state = ngx_smtp_ext_cmd;

        if (line.len == 0) {
            ctx->skip_line = 1;
            return NGX_OK;
        }

        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_too_long);
    }

    b->pos += line.consumed;

    ngx_mail_smtp_ext_metric_line(s, line.start, line.len);

    if (ctx->state == ngx_smtp_ext_auth_line) {
        return ngx_mail_smtp_ext_auth_line(s, line.start, line.len);
    }

    return ngx_mail_smtp_ext_execute(s, line.start, line.len);
}


static ngx_int_t
ngx_mail_smtp_ext_execute(ngx_mail_session_t *s, u_char *line, size_t len)
{
    int                            rc;
    ngx_smtp_cmd_t                 cmd;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    rc = ngx_smtp_parse_command(line, len, &cmd);

    if (rc == NGX_SMTP_E_SYNTAX && cmd.cmd == NGX_SMTP_CMD_BDAT) {
        /*
         * The chunk's size is unknown: what follows could be its data
         * or commands, and no reading is safe (RFC 3030): the session
         * ends.
         */

        ngx_log_error(NGX_LOG_INFO, s->connection->log, 0,
                      "client sent a BDAT without a valid size");

        ngx_mail_smtp_ext_end_tx(s);
        ngx_mail_smtp_ext_relay_close(s, 0);
        ngx_mail_smtp_ext_close(s, &ngx_smtp_ext_bdat_size);
        return NGX_DONE;
    }

    switch (rc) {

    case NGX_SMTP_OK:
        break;

    case NGX_SMTP_E_UNKNOWN:
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_unknown);

    case NGX_SMTP_E_PARAM:
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_param);

    case NGX_SMTP_E_UTF8:
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_utf8);

    default:
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_syntax);
    }

    if (cmd.cmd == NGX_SMTP_CMD_BDAT && sscf->chunking) {
        return ngx_mail_smtp_ext_bdat(s, &cmd);
    }

    if (cmd.cmd == NGX_SMTP_CMD_BDAT) {
        /*
         * CHUNKING is not offered: the chunk is read and dropped, under
         * the deadline of message data
         */

        ctx->skip = cmd.chunk;
        ctx->data_start = ngx_current_msec;
        ctx->data_in = 0;

        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_not_impl);
    }

    switch (cmd.cmd) {

    case NGX_SMTP_CMD_HELO:
    case NGX_SMTP_CMD_EHLO:
        return ngx_mail_smtp_ext_helo(s, &cmd);

    case NGX_SMTP_CMD_MAIL:
        return ngx_mail_smtp_ext_mail(s, &cmd);

    case NGX_SMTP_CMD_RCPT:
        ngx_mail_smtp_ext_metric_rcpt(s);
        return ngx_mail_smtp_ext_rcpt(s, &cmd);

    case NGX_SMTP_CMD_DATA:
        return ngx_mail_smtp_ext_data(s);

    case NGX_SMTP_CMD_RSET:
        ngx_mail_smtp_ext_end_tx(s);
        ngx_mail_smtp_ext_relay_reset(s);
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_ok);

    case NGX_SMTP_CMD_NOOP:
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_ok);

    case NGX_SMTP_CMD_QUIT:
        ngx_mail_smtp_ext_end_tx(s);
        ngx_mail_smtp_ext_relay_close(s, 1);
        ctx->quit = 1;
        ctx->state = ngx_smtp_ext_closing;
        (void) ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_bye);
        return NGX_AGAIN;

    case NGX_SMTP_CMD_VRFY:
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_vrfy);

    case NGX_SMTP_CMD_HELP:
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_help);

    case NGX_SMTP_CMD_STARTTLS:
        return ngx_mail_smtp_ext_starttls(s);

    case NGX_SMTP_CMD_AUTH:
        if (sscf->auth_methods == 0) {
            return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_no_auth);
        }

        return ngx_mail_smtp_ext_auth(s, &cmd);

    default:
        /* EXPN, BDAT: known, not offered */
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_not_impl);
    }
}


static ngx_int_t
ngx_mail_smtp_ext_helo(ngx_mail_session_t *s, ngx_smtp_cmd_t *cmd)
{
    ngx_str_t                     *reply;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;
#if (NGX_MAIL_SSL)
    ngx_mail_ssl_conf_t           *sslcf;
#endif

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    if (cmd->arg.len > NGX_MAIL_SMTP_EXT_HELO_MAX) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_syntax);
    }

    /* a new HELO resets the session (RFC 5321 4.1.4) */

    ngx_mail_smtp_ext_end_tx(s);

    if (ctx->greeted) {
        /* the backend knows the old HELO through XCLIENT */
        ngx_mail_smtp_ext_relay_close(s, 1);
    }

    /* sized to the name: reused while a later HELO fits */

    if (cmd->arg.len > ctx->helo_size) {
        ctx->helo = ngx_pnalloc(s->connection->pool, cmd->arg.len);
        if (ctx->helo == NULL) {
            ctx->helo_size = 0;
            ctx->helo_len = 0;
            return ngx_mail_smtp_ext_reply(s, &ngx_mail_smtp_ext_error_reply);
        }

        ctx->helo_size = cmd->arg.len;
    }

    ngx_memcpy(ctx->helo, cmd->arg.data, cmd->arg.len);
    ctx->helo_len = cmd->arg.len;
    ctx->greeted = 1;

    if (cmd->cmd == NGX_SMTP_CMD_HELO) {
        s->esmtp = 0;
        return ngx_mail_smtp_ext_reply(s, &sscf->helo);
    }

    s->esmtp = 1;
    reply = &sscf->ehlo;

#if (NGX_MAIL_SSL)
    sslcf = ngx_mail_get_module_srv_conf(s, ngx_mail_ssl_module);

    if (c->ssl == NULL && sslcf->starttls != NGX_MAIL_STARTTLS_OFF) {
        reply = &sscf->ehlo_starttls;
    }
#else
    (void) c;
#endif

    return ngx_mail_smtp_ext_reply(s, reply);
}


/*
 * MAIL and AUTH need a HELO/EHLO first and, with "starttls only", TLS:
 * the reply that refuses them, or NULL.
 */

ngx_str_t *
ngx_mail_smtp_ext_not_ready(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (!ctx->greeted) {
        return &ngx_smtp_ext_need_helo;
    }

#if (NGX_MAIL_SSL)
    if (ngx_mail_starttls_only(s, s->connection)) {
        return &ngx_smtp_ext_need_tls;
    }
#endif

    return NULL;
}


static ngx_int_t
ngx_mail_smtp_ext_mail(ngx_mail_session_t *s, ngx_smtp_cmd_t *cmd)
{
    u_char                        *p;
    ngx_str_t                     *reply;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    reply = ngx_mail_smtp_ext_not_ready(s);
    if (reply) {
        return ngx_mail_smtp_ext_reply(s, reply);
    }

    if (sscf->require_auth && s->login.len == 0) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_need_auth);
    }

    if (ctx->in_tx) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_nested);
    }

    if (cmd->size > sscf->max_message_size) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_too_big);
    }

    if ((cmd->dsn[0].len || cmd->dsn[1].len) && !sscf->dsn) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_param);
    }

    ctx->tpool = ngx_create_pool(1024, c->log);
    if (ctx->tpool == NULL) {
        return ngx_mail_smtp_ext_reply(s, &ngx_mail_smtp_ext_error_reply);
    }

    /* the line for the backend: parameters are added per backend */

    p = ngx_pnalloc(ctx->tpool, sizeof("MAIL FROM:<>") - 1 + cmd->path.len
                                + 2 + cmd->dsn[0].len + cmd->dsn[1].len);
    if (p == NULL) {
        ngx_destroy_pool(ctx->tpool);
        ctx->tpool = NULL;
        return ngx_mail_smtp_ext_reply(s, &ngx_mail_smtp_ext_error_reply);
    }

    ctx->mail_cmd.data = p;
    p = ngx_cpymem(p, "MAIL FROM:<", sizeof("MAIL FROM:<") - 1);
    ctx->from.data = p;
    ctx->from.len = cmd->path.len;
    p = ngx_cpymem(p, cmd->path.data, cmd->path.len);
    *p++ = '>';
    ctx->mail_cmd.len = p - ctx->mail_cmd.data;

    /* RET= and ENVID=, verbatim for a backend that lists DSN */

    ctx->mail_dsn.data = p;

    if (cmd->dsn[0].len) {
        *p++ = ' ';
        p = ngx_cpymem(p, cmd->dsn[0].data, cmd->dsn[0].len);
    }

    if (cmd->dsn[1].len) {
        *p++ = ' ';
        p = ngx_cpymem(p, cmd->dsn[1].data, cmd->dsn[1].len);
    }

    ctx->mail_dsn.len = p - ctx->mail_dsn.data;
    ctx->utf8_env = cmd->utf8_path;

    ctx->size = cmd->size;
    ctx->body8 = (cmd->body == NGX_SMTP_BODY_8BITMIME);
    ctx->smtputf8 = cmd->smtputf8;
    ctx->rcpts = 0;
    ctx->rcpts_tried = 0;
    ctx->route = NULL;
    ctx->last_code = 250;
    ctx->start = ngx_current_msec;
    ctx->in_tx = 1;

    /* edge protection (SPEC §10): the "mail" rate limits, checked last */

    if (ngx_mail_smtp_ext_ratelimit_check(s, NGX_MAIL_SMTP_EXT_RL_MAIL)
        == NGX_AGAIN)
    {
        ngx_mail_smtp_ext_wait_lookup(s);
        return NGX_AGAIN;   /* ngx_mail_smtp_ext_mail_limited() replies */
    }

    return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_mail_ok);
}


static ngx_int_t
ngx_mail_smtp_ext_rcpt(ngx_mail_session_t *s, ngx_smtp_cmd_t *cmd)
{
    u_char                        *p;
    ngx_int_t                      rc;
    ngx_str_t                     *rcpt;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    if (!ctx->in_tx) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_need_mail);
    }

    if (ctx->bdat_tx) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_after_bdat);
    }

    if (cmd->utf8_path && !ctx->smtputf8) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_utf8);
    }

    if (ctx->rcpts >= sscf->max_recipients) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_too_many);
    }

    if ((cmd->dsn[0].len || cmd->dsn[1].len) && !sscf->dsn) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_param);
    }

    ctx->rcpts_tried++;

    /* one copy for the recipient under way: refusals cost no memory */

    if (ctx->rcpt_buf == NULL) {
        ctx->rcpt_buf = ngx_pnalloc(ctx->tpool, 2 * NGX_SMTP_MAX_LINE);
        if (ctx->rcpt_buf == NULL) {
            return ngx_mail_smtp_ext_reply(s, &ngx_mail_smtp_ext_error_reply);
        }
    }

    rcpt = &ctx->rcpt;
    rcpt->len = ngx_min(cmd->path.len, NGX_SMTP_MAX_LINE);
    rcpt->data = ctx->rcpt_buf;
    ngx_memcpy(rcpt->data, cmd->path.data, rcpt->len);

    /* NOTIFY= and ORCPT= after it: both fit, the line had 512 octets */

    p = ctx->rcpt_buf + NGX_SMTP_MAX_LINE;
    ctx->rcpt_dsn.data = p;

    if (cmd->dsn[0].len) {
        *p++ = ' ';
        p = ngx_cpymem(p, cmd->dsn[0].data, cmd->dsn[0].len);
    }

    if (cmd->dsn[1].len) {
        *p++ = ' ';
        p = ngx_cpymem(p, cmd->dsn[1].data, cmd->dsn[1].len);
    }

    ctx->rcpt_dsn.len = p - ctx->rcpt_dsn.data;
    ctx->rcpt_utf8 = cmd->utf8_path;

    ctx->pending_rcpt = rcpt;
    ctx->pending_route = NULL;

    rc = ngx_mail_smtp_ext_route(s, rcpt);

    if (rc == NGX_OK) {
        return ngx_mail_smtp_ext_rcpt_relay(s);
    }

    if (rc == NGX_AGAIN) {
        return NGX_AGAIN;
    }

    /* a reply is queued */

    return NGX_OK;
}


/* the recipient's route is known: hand it to the backend of that route */

static ngx_int_t
ngx_mail_smtp_ext_rcpt_relay(ngx_mail_session_t *s)
{
    ngx_int_t                  rc;
    ngx_mail_smtp_ext_ctx_t   *ctx;
    ngx_mail_smtp_ext_pool_t  *pool;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    pool = ctx->pending_route;

    if (ctx->route && ctx->route != pool) {
        /* one transaction, one backend */
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_elsewhere);
    }

    /*
     * edge protection (SPEC §10): the "rcpt" rate limits, once routing
     * accepted the recipient; allowed, it calls rcpt_routed() again
     */

    if (ngx_mail_smtp_ext_ratelimit_check(s, NGX_MAIL_SMTP_EXT_RL_RCPT)
        == NGX_AGAIN)
    {
        ngx_mail_smtp_ext_wait_lookup(s);
        return NGX_AGAIN;
    }

    if (ngx_mail_smtp_ext_relay_usable(s, pool)) {
        return ngx_mail_smtp_ext_rcpt_send(s);
    }

    ngx_mail_smtp_ext_relay_close(s, 1);

    rc = ngx_mail_smtp_ext_relay_open(s, pool);

    if (rc == NGX_ERROR || rc == NGX_BUSY) {
        ctx->last_code = 451;
        return ngx_mail_smtp_ext_reply(s, rc == NGX_BUSY
                                          ? &ngx_smtp_ext_busy
                                          : &ngx_smtp_ext_no_backend);
    }

    ngx_mail_smtp_ext_wait(s, NGX_SMTP_EXT_STEP_OPEN);

    return NGX_AGAIN;
}


/*
 * The backend is ready for the recipient.  A transaction with a UTF-8
 * address or an 8-bit body never goes to a backend that cannot take it
 * (RFC 6531 3.4, RFC 6152 3): such a recipient is refused.
 */

static ngx_int_t
ngx_mail_smtp_ext_rcpt_send(ngx_mail_session_t *s)
{
    ngx_uint_t                caps;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    caps = ngx_mail_smtp_ext_relay_caps(s);

    if ((ctx->utf8_env || ctx->rcpt_utf8)
        && !(caps & NGX_SMTP_CAP_SMTPUTF8))
    {
        ctx->last_code = 553;
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_no_utf8);
    }

    if (ctx->body8 && !(caps & NGX_SMTP_CAP_8BITMIME)) {
        ctx->last_code = 554;
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_no_8bit);
    }

    ngx_mail_smtp_ext_wait(s, NGX_SMTP_EXT_STEP_RCPT);
    ngx_mail_smtp_ext_relay_rcpt(s, ctx->pending_rcpt);

    return NGX_AGAIN;
}


void
ngx_mail_smtp_ext_wait_lookup(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_wait(s, NGX_SMTP_EXT_STEP_LOOKUP);
}


/* a Redis lookup or a password check ended with a reply */

void
ngx_mail_smtp_ext_lookup_done(ngx_mail_session_t *s, ngx_str_t *reply)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    ctx->state = ngx_smtp_ext_cmd;
    ctx->step = 0;

    if (reply) {
        (void) ngx_mail_smtp_ext_reply(s, reply);
    }

    ngx_mail_smtp_ext_run(s);
}


void
ngx_mail_smtp_ext_rcpt_routed(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    ctx->state = ngx_smtp_ext_cmd;
    ctx->step = 0;

    (void) ngx_mail_smtp_ext_rcpt_relay(s);

    ngx_mail_smtp_ext_run(s);
}


static ngx_int_t
ngx_mail_smtp_ext_data(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (!ctx->in_tx) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_need_mail_data);
    }

    if (ctx->bdat_tx) {
        /* RFC 3030 3: the client must RSET; nothing reaches the backend */
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_after_bdat);
    }

    if (ctx->rcpts == 0) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_no_rcpts);
    }

    if (!ngx_mail_smtp_ext_relay_usable(s, ctx->route)) {
        /* the backend that took the recipients is gone */
        ctx->last_code = 451;
        (void) ngx_mail_smtp_ext_reply(s, &ngx_mail_smtp_ext_lost_reply);
        ngx_mail_smtp_ext_end_tx(s);
        ngx_mail_smtp_ext_relay_close(s, 0);
        return NGX_OK;
    }

    ngx_mail_smtp_ext_wait(s, NGX_MAIL_SMTP_EXT_STEP_DATA);
    ngx_mail_smtp_ext_relay_data(s);

    return NGX_AGAIN;
}


static ngx_int_t
ngx_mail_smtp_ext_starttls(ngx_mail_session_t *s)
{
#if (NGX_MAIL_SSL)
    ngx_connection_t         *c;
    ngx_mail_ssl_conf_t      *sslcf;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (c->ssl) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_in_tls);
    }

    sslcf = ngx_mail_get_module_srv_conf(s, ngx_mail_ssl_module);

    if (sslcf->starttls == NGX_MAIL_STARTTLS_OFF) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_not_impl);
    }

    /* RFC 3207: forget everything; drop what was pipelined after it */

    ngx_mail_smtp_ext_end_tx(s);
    ngx_mail_smtp_ext_relay_close(s, 1);

    ctx->greeted = 0;
    ctx->helo_len = 0;
    s->esmtp = 0;
    ngx_mail_smtp_ext_auth_reset(s);

    s->buffer->pos = s->buffer->start;
    s->buffer->last = s->buffer->start;

    (void) ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_tls_ready);

    ngx_mail_smtp_ext_metric_starttls(s);
    ctx->state = ngx_smtp_ext_starttls;
    c->read->handler = ngx_mail_starttls_handler;

    return NGX_AGAIN;
#else
    return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_not_impl);
#endif
}


void
ngx_mail_smtp_ext_relay_done(ngx_mail_session_t *s, ngx_int_t rc,
    ngx_uint_t code, u_char *reply, size_t len)
{
    ngx_uint_t                step;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    step = ctx->step;
    ctx->step = 0;
    ctx->state = ngx_smtp_ext_cmd;

    switch (step) {

    case NGX_SMTP_EXT_STEP_OPEN:
        if (rc != NGX_OK) {
            ctx->last_code = 451;
            (void) ngx_mail_smtp_ext_reply(s, rc == NGX_BUSY
                                              ? &ngx_smtp_ext_busy
                                              : &ngx_smtp_ext_no_backend);
            break;
        }

        if (ngx_mail_smtp_ext_rcpt_send(s) == NGX_AGAIN) {
            return;
        }

        break;

    case NGX_SMTP_EXT_STEP_RCPT:
        if (rc != NGX_OK) {
            ctx->last_code = 451;
            (void) ngx_mail_smtp_ext_reply(s, &ngx_mail_smtp_ext_lost_reply);
            break;
        }

        if (code / 100 == 2) {
            ctx->rcpts++;
            ctx->route = ctx->pending_route;
            ctx->utf8_env |= ctx->rcpt_utf8;
        }

        ngx_mail_smtp_ext_out_backend(s, reply, len);
        break;

    case NGX_MAIL_SMTP_EXT_STEP_DATA:
    case NGX_MAIL_SMTP_EXT_STEP_DOT:
    case NGX_MAIL_SMTP_EXT_STEP_BODY:
        if (ngx_mail_smtp_ext_data_step_done(s, step, rc, code, reply, len)
            == NGX_DONE)
        {
            return;
        }

        break;

    case NGX_MAIL_SMTP_EXT_STEP_BDAT:
    case NGX_MAIL_SMTP_EXT_STEP_CHUNK:
    case NGX_MAIL_SMTP_EXT_STEP_BDAT_BODY:
        ngx_mail_smtp_ext_bdat_done(s, step, rc, code, reply, len);
        break;

    default:
        ngx_log_error(NGX_LOG_ALERT, s->connection->log, 0,
                      "smtp_ext: backend step done while none was pending");
        return;
    }

    ngx_mail_smtp_ext_run(s);
}


void
ngx_mail_smtp_ext_end_tx(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (!ctx->in_tx) {
        return;
    }

    ngx_mail_smtp_ext_log_tx(s);

    /* with keepalive the backend connection goes back to the pool */
    ngx_mail_smtp_ext_relay_release(s);

    ctx->in_tx = 0;
    ctx->rcpts = 0;
    ctx->rcpts_tried = 0;
    ctx->route = NULL;
    ctx->size = -1;
    ctx->pending_rcpt = NULL;
    ctx->rcpt_buf = NULL;
    ctx->data.size = 0;
    ctx->bdat_tx = 0;
    ctx->in_chunk = 0;

    if (ctx->tpool) {
        ngx_destroy_pool(ctx->tpool);
        ctx->tpool = NULL;
    }
}


/* SPEC 7 and 9: one line per transaction (ngx_mail_smtp_ext_metrics.c) */

static void
ngx_mail_smtp_ext_log_tx(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_tx_log(s);
}


/*
 * Queues a reply.  Every 5xx of our own counts towards max_errors; at the
 * limit the client gets 421 and the session ends.  NGX_OK lets the
 * command loop go on, NGX_AGAIN stops it.
 */

ngx_int_t
ngx_mail_smtp_ext_reply(ngx_mail_session_t *s, ngx_str_t *reply)
{
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_core_srv_conf_t      *cscf;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if ((size_t) (ctx->out->end - ctx->out->last) < reply->len) {
        /*
         * The loop flushes before the buffer gets this full; a reply
         * left out would put the client out of step: end the session.
         */
        ngx_log_error(NGX_LOG_ALERT, s->connection->log, 0,
                      "smtp_ext: reply buffer full");
        ngx_mail_smtp_ext_end_tx(s);
        ngx_mail_smtp_ext_relay_close(s, 0);
        ctx->state = ngx_smtp_ext_closing;
        ctx->step = 0;
        return NGX_AGAIN;
    }

    ctx->out->last = ngx_cpymem(ctx->out->last, reply->data, reply->len);

    ngx_mail_smtp_ext_metric_reply(s, reply->data, reply->len);

    if (reply->data[0] != '5' || ctx->state == ngx_smtp_ext_closing) {
        return NGX_OK;
    }

    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);

    s->errors++;

    if (cscf->max_errors == 0 || s->errors < cscf->max_errors) {
        return NGX_OK;
    }

    ngx_log_error(NGX_LOG_INFO, s->connection->log, 0,
                  "client got too many error replies");

    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    ngx_mail_smtp_ext_end_tx(s);
    ngx_mail_smtp_ext_relay_close(s, 1);

    ctx->state = ngx_smtp_ext_closing;
    ctx->step = 0;

    (void) ngx_mail_smtp_ext_reply(s, &sscf->too_many_errors);

    return NGX_AGAIN;
}


/*
 * Queues a backend reply, enhanced codes added.  One that does not fit
 * the small reply buffer moves the queue to a larger one from the heap
 * until it is sent; beyond that it is cut to whole lines, never in the
 * middle of one.
 */

void
ngx_mail_smtp_ext_out_backend(ngx_mail_session_t *s, u_char *reply,
    size_t len)
{
    u_char                   *p, *last, *buf;
    size_t                    lines, need, queued;
    ngx_buf_t                *b;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    b = ctx->out;

    ngx_mail_smtp_ext_metric_reply(s, reply, len);

    last = reply + len;
    lines = 0;

    for (p = reply; p < last; p++) {
        if (*p == LF) {
            lines++;
        }
    }

    need = len + 6 * lines;
    queued = b->last - b->pos;

    if (need > (size_t) (b->end - b->last) && b != &ctx->big_out
        && queued + need <= NGX_SMTP_EXT_BIG_OUT)
    {
        buf = ngx_alloc(NGX_SMTP_EXT_BIG_OUT, s->connection->log);

        if (buf) {
            ctx->big_out.start = buf;
            ctx->big_out.pos = buf;
            ctx->big_out.last = ngx_cpymem(buf, b->pos, queued);
            ctx->big_out.end = buf + NGX_SMTP_EXT_BIG_OUT;
            ctx->big_out.temporary = 1;

            b->pos = b->start;
            b->last = b->start;

            b = &ctx->big_out;
            ctx->out = b;
        }
    }

    if (need <= (size_t) (b->end - b->last)) {
        b->last += ngx_smtp_copy_reply(b->last, reply, len);
        return;
    }

    len = ngx_smtp_shorten_reply(b->last, b->end - b->last, reply, len);

    if (len == 0) {
        (void) ngx_mail_smtp_ext_reply(s, &ngx_mail_smtp_ext_error_reply);
        return;
    }

    b->last += len;
}


void
ngx_mail_smtp_ext_wait(ngx_mail_session_t *s, ngx_uint_t step)
{
    ngx_connection_t         *c;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    ctx->state = ngx_smtp_ext_wait;
    ctx->step = step;

    /* the backend's timeouts apply now, not the client's */

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }
}


/*
 * Sends queued replies.  NGX_OK: all sent; NGX_AGAIN: the rest waits for
 * the write event; NGX_DONE: the session was closed.
 */

ngx_int_t
ngx_mail_smtp_ext_flush(ngx_mail_session_t *s)
{
    ssize_t                    n;
    ngx_buf_t                 *b;
    ngx_connection_t          *c;
    ngx_mail_smtp_ext_ctx_t   *ctx;
    ngx_mail_core_srv_conf_t  *cscf;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    b = ctx->out;

    while (b->pos < b->last) {

        n = c->send(c, b->pos, b->last - b->pos);

        if (n == NGX_ERROR) {
            ngx_mail_smtp_ext_relay_close(s, 0);
            ngx_mail_smtp_ext_close(s, NULL);
            return NGX_DONE;
        }

        if (n == NGX_AGAIN || n == 0) {
            ctx->out_blocked = 1;

            cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);
            ngx_add_timer(c->write, cscf->timeout);

            if (ngx_handle_write_event(c->write, 0) != NGX_OK) {
                ngx_mail_smtp_ext_close(s, NULL);
                return NGX_DONE;
            }

            return NGX_AGAIN;
        }

        b->pos += n;
    }

    b->pos = b->start;
    b->last = b->start;
    ctx->out_blocked = 0;

    if (b == &ctx->big_out) {
        ngx_free(b->start);
        b->start = NULL;
        ctx->out = &ctx->out_buf;
    }

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    if (ctx->state == ngx_smtp_ext_closing) {
        ngx_mail_smtp_ext_linger(s);
        return NGX_DONE;
    }

    return NGX_OK;
}


/*
 * After the last reply: the client's unread input must not turn our
 * close into a reset that destroys the reply before it is read (a
 * client that still sends when it gets 421).  Send FIN, drain the input
 * a little while, then close (as nginx's lingering close in http).
 */

static void
ngx_mail_smtp_ext_linger(ngx_mail_session_t *s)
{
    ngx_connection_t  *c;

    c = s->connection;

    ngx_mail_smtp_ext_relay_close(s, 0);

    if (c->ssl || c->read->eof || c->read->error
        || shutdown(c->fd, SHUT_WR) == -1)
    {
        ngx_mail_close_connection(c);
        return;
    }

    c->idle = 0;
    c->read->handler = ngx_mail_smtp_ext_linger_handler;
    c->write->handler = ngx_mail_smtp_ext_linger_handler;

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    ngx_add_timer(c->read, NGX_SMTP_EXT_LINGER);

    ngx_mail_smtp_ext_linger_handler(c->read);
}


static void
ngx_mail_smtp_ext_linger_handler(ngx_event_t *ev)
{
    ssize_t            n;
    ngx_uint_t         i;
    ngx_connection_t  *c;
    u_char             buf[NGX_SMTP_MAX_LINE];

    c = ev->data;

    if (ev->write) {
        return;
    }

    if (ev->timedout) {
        ngx_mail_close_connection(c);
        return;
    }

    for (i = 0; i < 64; i++) {
        n = c->recv(c, buf, sizeof(buf));

        if (n == NGX_AGAIN) {
            if (ngx_handle_read_event(ev, 0) != NGX_OK) {
                ngx_mail_close_connection(c);
            }

            return;
        }

        if (n == NGX_ERROR || n == 0) {
            ngx_mail_close_connection(c);
            return;
        }
    }

    /* a flood: read the rest later, within the same deadline */
    ngx_post_event(ev, &ngx_posted_events);
}


static void
ngx_mail_smtp_ext_write_handler(ngx_event_t *wev)
{
    ngx_connection_t         *c;
    ngx_mail_session_t       *s;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    c = wev->data;
    s = c->data;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (wev->timedout) {
        ngx_log_error(NGX_LOG_INFO, c->log, NGX_ETIMEDOUT,
                      "client timed out");
        c->timedout = 1;
        ngx_mail_smtp_ext_relay_close(s, 0);
        ngx_mail_smtp_ext_close(s, NULL);
        return;
    }

    if (!ctx->out_blocked) {
        return;
    }

    if (ngx_mail_smtp_ext_flush(s) != NGX_OK) {
        return;
    }

    ngx_mail_smtp_ext_run(s);
}


/* closes the client connection, after a last reply if one is given */

static void
ngx_mail_smtp_ext_close(ngx_mail_session_t *s, ngx_str_t *reply)
{
    ngx_connection_t         *c;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (reply) {
        ctx->out_blocked = 0;
        ctx->state = ngx_smtp_ext_closing;
        (void) ngx_mail_smtp_ext_reply(s, reply);

        if (ngx_mail_smtp_ext_flush(s) != NGX_AGAIN) {
            return;
        }

        /* no more waiting for a client that does not read */
        ngx_mail_close_connection(c);
        return;
    }

    ngx_mail_close_connection(c);
}


/* edge protection (SPEC §10): a refusal instead of the greeting */

void
ngx_mail_smtp_ext_refuse(ngx_mail_session_t *s, ngx_str_t *reply)
{
    ngx_mail_smtp_ext_close(s, reply);
}


/* edge protection (SPEC §10): the "mail" rate limit answered */

void
ngx_mail_smtp_ext_mail_limited(ngx_mail_session_t *s, ngx_str_t *reply)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (reply == NULL) {
        ngx_mail_smtp_ext_lookup_done(s, &ngx_smtp_ext_mail_ok);
        return;
    }

    /* refused: no transaction was started, nothing to log */

    ctx->in_tx = 0;

    if (ctx->tpool) {
        ngx_destroy_pool(ctx->tpool);
        ctx->tpool = NULL;
    }

    ngx_mail_smtp_ext_lookup_done(s, reply);
}


/* the session's pool dies: end the transaction and the backend with it */

static void
ngx_mail_smtp_ext_cleanup(void *data)
{
    ngx_mail_session_t  *s = data;

    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (ctx == NULL) {
        return;
    }

    if (ctx->in_tx) {
        /* the client left before the transaction ended */
        ctx->last_code = 0;
    }

    ngx_mail_smtp_ext_end_tx(s);

    if (ctx->dbuf.start) {
        ngx_free(ctx->dbuf.start);
        ctx->dbuf.start = NULL;
    }

    if (ctx->big_out.start) {
        ngx_free(ctx->big_out.start);
        ctx->big_out.start = NULL;
    }

    ngx_mail_smtp_ext_relay_close(s, ctx->state == ngx_smtp_ext_cmd
                                     || ctx->state == ngx_smtp_ext_closing);
}
