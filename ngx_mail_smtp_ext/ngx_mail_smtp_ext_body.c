
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * BDAT (RFC 3030): exactly n octets follow the command line and are
 * message data, whatever they hold.  A backend that lists CHUNKING gets
 * them as BDAT, one backend chunk per client chunk, the header first and
 * the octets as they arrive; one that does not gets DATA, the chunks in
 * the dot-stuffed wire form (ngx_smtp_bdat_convert()) and, at LAST, the
 * end of data (ngx_smtp_bdat_end()).
 *
 * A chunk without LAST is answered "250 2.0.0 n octets received" once its
 * octets are written to the backend (as BDAT: once the backend took
 * them); LAST gets the backend's final reply.  The size limit, a bare CR
 * or LF in reject mode or a backend failure fail the transaction: the
 * backend connection is closed without the end of the message, later
 * chunks are read and dropped, and LAST gets the reply that says why.
 *
 * DATA (RFC 5321 4.1.1.4): after the backend's 354 the client's input is
 * scanned (ngx_smtp_data_scan()) into the relay's buffer, or lent to the
 * relay as it is where nothing in it needs changing, up to the end of
 * data; the backend's reply to the dot is the client's.  The size limit
 * or a bare CR or LF in reject mode fail the message the same way: the
 * backend never sees its end.  Both read into a heap buffer taken for
 * the message only (ngx_mail_smtp_ext_data_buffer()).
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>

#include "ngx_mail_smtp_ext_module.h"


#define ngx_smtp_ext_reply(s)     ngx_string(s CRLF)

static ngx_str_t  ngx_smtp_ext_bdat_need_mail = ngx_smtp_ext_reply(
    "503 5.5.1 Need MAIL before BDAT");
static ngx_str_t  ngx_smtp_ext_bdat_need_rcpt = ngx_smtp_ext_reply(
    "503 5.5.1 Need RCPT before BDAT");
static ngx_str_t  ngx_smtp_ext_go_ahead = ngx_smtp_ext_reply(
    "354 End data with <CR><LF>.<CR><LF>");
static ngx_str_t  ngx_smtp_ext_too_big = ngx_smtp_ext_reply(
    "552 5.3.4 Message size exceeds fixed maximum message size");
static ngx_str_t  ngx_smtp_ext_bare = ngx_smtp_ext_reply(
    "550 5.6.11 Bare CR or LF not allowed in message data");


static ngx_int_t ngx_mail_smtp_ext_data_end(ngx_mail_session_t *s);
static ngx_int_t ngx_mail_smtp_ext_bdat_send(ngx_mail_session_t *s,
    ngx_buf_t *ob);
static ngx_int_t ngx_mail_smtp_ext_bdat_chunk_end(ngx_mail_session_t *s);
static ngx_int_t ngx_mail_smtp_ext_bdat_failed(ngx_mail_session_t *s);
static void ngx_mail_smtp_ext_bdat_abort(ngx_mail_session_t *s);


/*
 * The relay finished a DATA step: the reply to DATA (354 starts the
 * body), to the final dot, or a blocked body write drained.  NGX_DONE:
 * the session is closed.
 */

ngx_int_t
ngx_mail_smtp_ext_data_step_done(ngx_mail_session_t *s, ngx_uint_t step,
    ngx_int_t rc, ngx_uint_t code, u_char *reply, size_t len)
{
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    switch (step) {

    case NGX_MAIL_SMTP_EXT_STEP_DATA:
        if (rc != NGX_OK) {
            ctx->last_code = 451;
            (void) ngx_mail_smtp_ext_reply(s, &ngx_mail_smtp_ext_lost_reply);
            ngx_mail_smtp_ext_end_tx(s);
            break;
        }

        if (code != 354) {
            ctx->last_code = code;
            ngx_mail_smtp_ext_out_backend(s, reply, len);
            break;
        }

        sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

        ngx_memzero(&ctx->data, sizeof(ngx_smtp_data_t));
        ctx->data.max_size = sscf->max_message_size;
        ctx->data.reject = (sscf->bare_lf == NGX_SMTP_BARE_LF_REJECT);
        ctx->data_failed = 0;
        ctx->data_start = ngx_current_msec;
        ctx->data_in = 0;

        if (ngx_mail_smtp_ext_data_buffer(s) != NGX_OK) {
            ctx->last_code = 451;
            ngx_mail_smtp_ext_relay_close(s, 0);
            ngx_mail_smtp_ext_end_tx(s);
            (void) ngx_mail_smtp_ext_reply(s, &ngx_mail_smtp_ext_error_reply);
            break;
        }

        (void) ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_go_ahead);

        ngx_mail_smtp_ext_metric_data(s);
        ctx->state = ngx_smtp_ext_data;

        return ngx_mail_smtp_ext_flush(s) == NGX_DONE ? NGX_DONE : NGX_OK;

    case NGX_MAIL_SMTP_EXT_STEP_DOT:
        if (rc != NGX_OK) {
            (void) ngx_mail_smtp_ext_data_failed(s);
            break;
        }

        ctx->last_code = code;
        ngx_mail_smtp_ext_metric_relayed(s);
        ngx_mail_smtp_ext_out_backend(s, reply, len);
        ngx_mail_smtp_ext_data_done(s);
        break;

    default: /* NGX_MAIL_SMTP_EXT_STEP_BODY */
        /* the backend took the body so far, or failed: read on */

        ctx->state = ngx_smtp_ext_data;
        ctx->data_start += ngx_current_msec - ctx->wait_start;

        if (rc != NGX_OK) {
            ctx->data_failed = 1;
        }

        break;
    }

    return NGX_OK;
}


/*
 * DATA: scans the client's input into the relay's buffer and sends it.
 * NGX_OK: go on; NGX_AGAIN: needs input, or waits for the backend;
 * NGX_DONE: the session is closed.
 */

ngx_int_t
ngx_mail_smtp_ext_data_body(ngx_mail_session_t *s)
{
    int                       rc;
    size_t                    in_used, out_used, len;
    ngx_int_t                 n;
    ngx_buf_t                *b, *ob;
    ngx_smtp_data_t           verbatim;
    ngx_mail_smtp_ext_ctx_t  *ctx;
    u_char                    scratch[NGX_SMTP_MAX_LINE];

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    b = s->buffer;

    ob = ctx->data_failed ? NULL : ngx_mail_smtp_ext_relay_body_buf(s);

    if (ob == NULL && !ctx->data_failed) {
        ctx->data_failed = 1;
        ngx_mail_smtp_ext_relay_close(s, 0);
    }

    while (b->pos < b->last) {

        if (ob && ob->pos == ob->last
            && !ngx_mail_smtp_ext_relay_span_pending(s))
        {
            /*
             * Text that passes unchanged goes to the backend from the
             * input buffer, no copy; what follows it in this chunk (the
             * final dot, say) is scanned into the relay's buffer and both
             * go out in one write.
             */

            verbatim = ctx->data;
            len = ngx_min((size_t) (b->last - b->pos),
                          (size_t) (ob->end - ob->start));
            len = ngx_smtp_data_verbatim(&verbatim, b->pos, b->pos + len,
                                         NGX_MAIL_SMTP_EXT_DIRECT_MIN);

            if (len
                && ngx_mail_smtp_ext_relay_body_span(s, b->pos, len)
                   == NGX_OK)
            {
                ctx->data = verbatim;
                b->pos += len;
                continue;
            }
        }

        if (ob) {
            rc = ngx_smtp_data_scan(&ctx->data, b->pos, b->last,
                                    ob->last, ob->end, &in_used, &out_used);
            ob->last += out_used;

        } else {
            /* discarding: scan only to find the end of data */
            rc = ngx_smtp_data_scan(&ctx->data, b->pos, b->last,
                                    scratch, scratch + sizeof(scratch),
                                    &in_used, &out_used);
        }

        b->pos += in_used;

        if (ob && ((ctx->data.reject && ctx->data.bare) || ctx->data.too_big)) {
            /* no end of data may ever reach the backend */
            ctx->data_failed = 1;
            ngx_mail_smtp_ext_relay_close(s, 0);
            ob = NULL;
        }

        if (rc == NGX_SMTP_OK) {
            return ngx_mail_smtp_ext_data_end(s);
        }

        /* the scanner needs a few octets of room to make progress */

        if (ob && (size_t) (ob->end - ob->last) < 8) {
            break;
        }
    }

    if (ob == NULL
        || (ob->last == ob->pos && !ngx_mail_smtp_ext_relay_span_pending(s)))
    {
        return NGX_AGAIN;
    }

    n = ngx_mail_smtp_ext_relay_body(s, 0);

    if (n == NGX_OK) {
        return (b->pos < b->last) ? NGX_OK : NGX_AGAIN;
    }

    if (n == NGX_ERROR) {
        ctx->data_failed = 1;
        return NGX_OK;
    }

    /*
     * The backend does not keep up: stop reading until it does.  The
     * client waits for us now: the relay's write timeout applies, and
     * the time does not count against the client's DATA deadline.
     */

    ngx_mail_smtp_ext_wait(s, NGX_MAIL_SMTP_EXT_STEP_BODY);
    ctx->wait_start = ngx_current_msec;

    return NGX_AGAIN;
}


static ngx_int_t
ngx_mail_smtp_ext_data_end(ngx_mail_session_t *s)
{
    ngx_int_t                 n;
    ngx_str_t                *reply;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    ngx_mail_smtp_ext_metric_dot(s);

    if (!ctx->data_failed) {
        n = ngx_mail_smtp_ext_relay_body(s, 1);

        if (n != NGX_ERROR) {
            /* the final reply comes through ngx_mail_smtp_ext_relay_done */
            ngx_mail_smtp_ext_wait(s, NGX_MAIL_SMTP_EXT_STEP_DOT);
            return NGX_AGAIN;
        }
    }

    if (ctx->data.too_big) {
        reply = &ngx_smtp_ext_too_big;
        ctx->last_code = 552;

    } else if (ctx->data.reject && ctx->data.bare) {
        reply = &ngx_smtp_ext_bare;
        ctx->last_code = 550;

    } else {
        return ngx_mail_smtp_ext_data_failed(s);
    }

    ngx_mail_smtp_ext_relay_close(s, 0);
    ngx_mail_smtp_ext_data_done(s);

    return ngx_mail_smtp_ext_reply(s, reply);
}


/*
 * The backend gave up the message: its own 5xx when it sent one before
 * the end of data, else 451.  Its connection is closed already.
 */

ngx_int_t
ngx_mail_smtp_ext_data_failed(ngx_mail_session_t *s)
{
    u_char                   *p;
    size_t                    len;
    ngx_uint_t                code;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    code = ngx_mail_smtp_ext_relay_early_reply(s, &p, &len);

    if (code) {
        ctx->last_code = code;
        ngx_mail_smtp_ext_out_backend(s, p, len);

    } else {
        ctx->last_code = 451;
        (void) ngx_mail_smtp_ext_reply(s, &ngx_mail_smtp_ext_lost_reply);
    }

    ngx_mail_smtp_ext_relay_close(s, 0);
    ngx_mail_smtp_ext_data_done(s);

    return ctx->state == ngx_smtp_ext_closing ? NGX_AGAIN : NGX_OK;
}


void
ngx_mail_smtp_ext_data_done(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    ctx->state = ngx_smtp_ext_cmd;
    ngx_mail_smtp_ext_metric_data_end(s);
    ngx_mail_smtp_ext_end_tx(s);
    ngx_mail_smtp_ext_data_buffer_release(s);
}


/*
 * DATA reads into a larger buffer of its own, taken from the heap only
 * while needed so that idle sessions stay small.
 */

ngx_int_t
ngx_mail_smtp_ext_data_buffer(ngx_mail_session_t *s)
{
    size_t                    len;
    ngx_buf_t                *b;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (s->buffer == &ctx->dbuf) {
        return NGX_OK;
    }

    b = &ctx->dbuf;

    b->start = ngx_alloc(NGX_MAIL_SMTP_EXT_DATA_IN_BUF, s->connection->log);
    if (b->start == NULL) {
        return NGX_ERROR;
    }

    len = s->buffer->last - s->buffer->pos;

    b->end = b->start + NGX_MAIL_SMTP_EXT_DATA_IN_BUF;
    b->pos = b->start;
    b->last = ngx_cpymem(b->start, s->buffer->pos, len);
    b->temporary = 1;

    ctx->cmdbuf = s->buffer;
    s->buffer = b;

    return NGX_OK;
}


void
ngx_mail_smtp_ext_data_buffer_release(ngx_mail_session_t *s)
{
    size_t                    len;
    ngx_buf_t                *b;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    b = &ctx->dbuf;

    if (s->buffer != b) {
        return;
    }

    if (ngx_mail_smtp_ext_relay_span_pending(s)) {
        /* cannot happen: a span is returned before its DATA ends */
        ngx_log_error(NGX_LOG_ALERT, s->connection->log, 0,
                      "smtp_ext: DATA buffer still lent to the backend");
        ngx_mail_smtp_ext_relay_close(s, 0);
    }

    len = b->last - b->pos;

    if (len > (size_t) (ctx->cmdbuf->end - ctx->cmdbuf->start)) {
        /* pipelined commands after the dot: keep it until they are read */
        return;
    }

    ctx->cmdbuf->pos = ctx->cmdbuf->start;
    ctx->cmdbuf->last = ngx_cpymem(ctx->cmdbuf->start, b->pos, len);
    s->buffer = ctx->cmdbuf;

    ngx_free(b->start);
    b->start = NULL;
}


/* BDAT */

ngx_int_t
ngx_mail_smtp_ext_bdat(ngx_mail_session_t *s, ngx_smtp_cmd_t *cmd)
{
    ngx_uint_t                     first, last;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    /* the chunk is under the deadline of message data from now on */

    ctx->data_start = ngx_current_msec;
    ctx->data_in = 0;

    if (!ctx->in_tx || ctx->rcpts == 0) {
        /* refused, but its octets are data all the same: dropped */
        ctx->skip = cmd->chunk;

        return ngx_mail_smtp_ext_reply(s, ctx->in_tx
                                          ? &ngx_smtp_ext_bdat_need_rcpt
                                          : &ngx_smtp_ext_bdat_need_mail);
    }

    ctx->chunk = cmd->chunk;
    ctx->chunk_left = cmd->chunk;
    ctx->chunk_last = cmd->last;

    first = !ctx->bdat_tx;

    if (first) {
        ctx->bdat_tx = 1;
        ctx->bdat_final = 0;
        ctx->data_failed = 0;
        ctx->bdat_reply.len = 0;

        ngx_memzero(&ctx->bdat, sizeof(ngx_smtp_bdat_t));
        ctx->bdat.max_size = sscf->max_message_size;
        ctx->bdat.reject = (sscf->bare_lf == NGX_SMTP_BARE_LF_REJECT);

        ctx->bdat_relay = (ngx_mail_smtp_ext_relay_caps(s)
                           & NGX_SMTP_CAP_CHUNKING) ? 1 : 0;

        if (!ngx_mail_smtp_ext_relay_usable(s, ctx->route)) {
            /* the backend that took the recipients is gone: 451 at LAST */
            ngx_mail_smtp_ext_relay_close(s, 0);
            ctx->data_failed = 1;
        }
    }

    if (ngx_mail_smtp_ext_data_buffer(s) != NGX_OK && !ctx->data_failed) {
        /* the chunk is still read, through the command buffer */
        ngx_mail_smtp_ext_bdat_abort(s);
    }

    /* the size is known ahead: no octet past the limit goes out */

    if (ctx->bdat.max_size
        && ctx->chunk > ctx->bdat.max_size - ctx->bdat.size)
    {
        ctx->bdat.too_big = 1;

        if (!ctx->data_failed) {
            ngx_mail_smtp_ext_bdat_abort(s);
        }
    }

    ctx->in_chunk = 1;
    ctx->state = ngx_smtp_ext_data;

    if (first) {
        ngx_mail_smtp_ext_metric_data(s);
    }

    if (ctx->data_failed) {
        return NGX_OK;
    }

    if (ctx->bdat_relay) {
        /*
         * In reject mode a bare CR or LF may still come in this very
         * chunk: LAST then goes in a chunk of its own once the whole
         * message is checked.
         */

        last = ctx->chunk_last && !ctx->bdat.reject;

        if (ngx_mail_smtp_ext_relay_bdat(s, ctx->chunk, last) != NGX_OK) {
            /* a broken relay keeps the backend's reply for LAST */
            ctx->data_failed = 1;
            return NGX_OK;
        }

        ctx->bdat_final = last;
        return NGX_OK;
    }

    if (!first) {
        /* DATA was accepted with the first chunk */
        return NGX_OK;
    }

    ngx_mail_smtp_ext_wait(s, NGX_MAIL_SMTP_EXT_STEP_BDAT);
    ngx_mail_smtp_ext_relay_data(s);

    return NGX_AGAIN;
}


/*
 * Reads the chunk's octets into the relay's buffer, or lends them to the
 * relay from the input buffer, and sends them.  NGX_OK: go on; NGX_AGAIN:
 * needs input, or waits for the backend.
 */

ngx_int_t
ngx_mail_smtp_ext_bdat_body(ngx_mail_session_t *s)
{
    size_t                    avail, used, n;
    ngx_uint_t                span;
    ngx_buf_t                *b, *ob;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    b = s->buffer;

    ob = NULL;

    if (!ctx->data_failed) {
        ob = ngx_mail_smtp_ext_relay_body_buf(s);

        if (ob == NULL) {
            /* the backend failed between two chunks: its reply is kept */
            ctx->data_failed = 1;
        }
    }

    while (ctx->chunk_left && b->pos < b->last) {

        avail = (size_t) ngx_min((off_t) (b->last - b->pos), ctx->chunk_left);

        if (ob == NULL) {
            /* dropped, still counted and checked for the final reply */
            (void) ngx_smtp_bdat_convert(&ctx->bdat, b->pos, avail, NULL, 0,
                                         &used);
            b->pos += avail;
            ctx->chunk_left -= avail;
            continue;
        }

        if (ctx->bdat_relay) {

            /*
             * The octets go as they are, checked first: a long run from
             * the input buffer itself, else copied after what the
             * relay's buffer holds (the header, say).
             */

            span = (ob->pos == ob->last
                    && !ngx_mail_smtp_ext_relay_span_pending(s)
                    && avail >= NGX_MAIL_SMTP_EXT_DIRECT_MIN);

            n = span ? avail : ngx_min(avail, (size_t) (ob->end - ob->last));

            if (n == 0) {
                break;
            }

            (void) ngx_smtp_bdat_convert(&ctx->bdat, b->pos, n, NULL, 0,
                                         &used);

            if (ctx->bdat.reject && ctx->bdat.bare) {
                b->pos += n;
                ctx->chunk_left -= n;
                ngx_mail_smtp_ext_bdat_abort(s);
                ob = NULL;
                continue;
            }

            if (span) {
                if (ngx_mail_smtp_ext_relay_body_span(s, b->pos, n)
                    != NGX_OK)
                {
                    b->pos += n;
                    ctx->chunk_left -= n;
                    ngx_mail_smtp_ext_bdat_abort(s);
                    ob = NULL;
                    continue;
                }

            } else {
                ob->last = ngx_cpymem(ob->last, b->pos, n);
            }

            b->pos += n;
            ctx->chunk_left -= n;

            if (span) {
                /* nothing may go into the buffer before the span is sent */
                break;
            }

            continue;
        }

        /* DATA: the dot-stuffed wire form */

        if ((size_t) (ob->end - ob->last) < NGX_SMTP_BDAT_GROWTH) {
            break;
        }

        n = ngx_smtp_bdat_convert(&ctx->bdat, b->pos, avail, ob->last,
                                  ob->end - ob->last, &used);
        ob->last += n;
        b->pos += used;
        ctx->chunk_left -= used;

        if ((ctx->bdat.reject && ctx->bdat.bare) || ctx->bdat.too_big) {
            /* no end of data may ever reach the backend */
            ngx_mail_smtp_ext_bdat_abort(s);
            ob = NULL;
        }
    }

    if (ob == NULL) {
        return ctx->chunk_left ? NGX_AGAIN
                               : ngx_mail_smtp_ext_bdat_chunk_end(s);
    }

    return ngx_mail_smtp_ext_bdat_send(s, ob);
}


static ngx_int_t
ngx_mail_smtp_ext_bdat_send(ngx_mail_session_t *s, ngx_buf_t *ob)
{
    size_t                    n;
    ngx_int_t                 rc;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (ctx->chunk_left == 0
        && (ctx->bdat_relay
            || (ctx->chunk_last
                && (size_t) (ob->end - ob->last) >= NGX_SMTP_BDAT_END)))
    {
        /* the whole chunk is read: its reply is due */

        if (ctx->chunk_last) {
            ngx_mail_smtp_ext_metric_dot(s);
        }

        if (!ctx->bdat_relay) {
            n = ngx_smtp_bdat_end(&ctx->bdat, ob->last);

            if (n == 0) {
                /* it ended in a bare CR, in reject mode */
                ngx_mail_smtp_ext_bdat_abort(s);
                return ngx_mail_smtp_ext_bdat_chunk_end(s);
            }

            ob->last += n;
            ctx->bdat_final = 1;
        }

        if (ngx_mail_smtp_ext_relay_body(s, 1) == NGX_ERROR) {
            ctx->data_failed = 1;
            return ngx_mail_smtp_ext_bdat_chunk_end(s);
        }

        ngx_mail_smtp_ext_wait(s, NGX_MAIL_SMTP_EXT_STEP_CHUNK);
        return NGX_AGAIN;
    }

    if (ob->pos == ob->last && !ngx_mail_smtp_ext_relay_span_pending(s)) {
        /* all written: as DATA a chunk without LAST is done */
        return ctx->chunk_left ? NGX_AGAIN
                               : ngx_mail_smtp_ext_bdat_chunk_end(s);
    }

    rc = ngx_mail_smtp_ext_relay_body(s, 0);

    if (rc == NGX_OK) {
        return NGX_OK;
    }

    if (rc == NGX_ERROR) {
        ctx->data_failed = 1;
        return NGX_OK;
    }

    /* back-pressure: the wait does not count against the client */

    ngx_mail_smtp_ext_wait(s, NGX_MAIL_SMTP_EXT_STEP_BDAT_BODY);
    ctx->wait_start = ngx_current_msec;

    return NGX_AGAIN;
}


/* the relay finished a step started here */

void
ngx_mail_smtp_ext_bdat_done(ngx_mail_session_t *s, ngx_uint_t step,
    ngx_int_t rc, ngx_uint_t code, u_char *reply, size_t len)
{
    u_char                    scratch[NGX_SMTP_BDAT_END];
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    switch (step) {

    case NGX_MAIL_SMTP_EXT_STEP_BDAT:
        /* DATA for the first chunk: with its 354 the chunk flows */

        ctx->state = ngx_smtp_ext_data;
        ctx->data_start = ngx_current_msec;

        if (rc != NGX_OK) {
            ctx->data_failed = 1;
            break;
        }

        if (code != 354) {
            /* kept for LAST: the chunks are read and dropped until then */

            ctx->data_failed = 1;
            ctx->bdat_reply.data = ngx_pnalloc(ctx->tpool, len);

            if (ctx->bdat_reply.data) {
                ngx_memcpy(ctx->bdat_reply.data, reply, len);
                ctx->bdat_reply.len = len;
            }
        }

        break;

    case NGX_MAIL_SMTP_EXT_STEP_BDAT_BODY:
        ctx->state = ngx_smtp_ext_data;
        ctx->data_start += ngx_current_msec - ctx->wait_start;

        if (rc != NGX_OK) {
            ctx->data_failed = 1;
        }

        break;

    case NGX_MAIL_SMTP_EXT_STEP_CHUNK:

        if (rc != NGX_OK) {
            ctx->data_failed = 1;
            (void) ngx_mail_smtp_ext_bdat_chunk_end(s);
            break;
        }

        if (ctx->bdat_final) {
            /* the backend's final reply: end-to-end */
            ctx->data.size = ctx->bdat.size;
            ctx->data.dots = 0;
            ctx->last_code = code;
            ngx_mail_smtp_ext_metric_relayed(s);
            ngx_mail_smtp_ext_out_backend(s, reply, len);
            ngx_mail_smtp_ext_data_done(s);
            break;
        }

        if (ctx->chunk_last) {
            /* reject mode: the whole message is checked, LAST goes now */

            (void) ngx_smtp_bdat_end(&ctx->bdat, scratch);

            if (ctx->bdat.bare) {
                ngx_mail_smtp_ext_bdat_abort(s);
                (void) ngx_mail_smtp_ext_bdat_chunk_end(s);
                break;
            }

            if (ngx_mail_smtp_ext_relay_bdat(s, 0, 1) != NGX_OK
                || ngx_mail_smtp_ext_relay_body(s, 1) == NGX_ERROR)
            {
                ctx->data_failed = 1;
                (void) ngx_mail_smtp_ext_bdat_chunk_end(s);
                break;
            }

            ctx->bdat_final = 1;
            ngx_mail_smtp_ext_wait(s, NGX_MAIL_SMTP_EXT_STEP_CHUNK);
            break;
        }

        (void) ngx_mail_smtp_ext_bdat_chunk_end(s);
        break;
    }
}


/* all of a chunk is read (and taken): its reply */

static ngx_int_t
ngx_mail_smtp_ext_bdat_chunk_end(ngx_mail_session_t *s)
{
    u_char                   *p;
    ngx_str_t                 reply;
    ngx_mail_smtp_ext_ctx_t  *ctx;
    u_char                    buf[NGX_OFF_T_LEN + 48];

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    ctx->in_chunk = 0;
    ctx->state = ngx_smtp_ext_cmd;
    ctx->data.size = ctx->bdat.size;
    ctx->data.dots = 0;

    if (ctx->chunk_last) {
        ngx_mail_smtp_ext_metric_dot(s);

        /* a LAST that ends here: the transaction failed */
        return ngx_mail_smtp_ext_bdat_failed(s);
    }

    /* RFC 3030 2: what was received, even for a failed transaction */

    p = ngx_sprintf(buf, "250 2.0.0 %O octets received" CRLF, ctx->chunk);

    reply.data = buf;
    reply.len = p - buf;

    return ngx_mail_smtp_ext_reply(s, &reply);
}


/*
 * LAST of a failed transaction: the size limit first, then a bare CR or
 * LF in reject mode, then the backend's refusal of DATA, its early 5xx,
 * or 451.
 */

static ngx_int_t
ngx_mail_smtp_ext_bdat_failed(ngx_mail_session_t *s)
{
    ngx_str_t                *reply;
    ngx_mail_smtp_ext_ctx_t  *ctx;
    u_char                    scratch[NGX_SMTP_BDAT_END];

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    /* a message that ends in a CR has a bare one */
    (void) ngx_smtp_bdat_end(&ctx->bdat, scratch);

    if (ctx->bdat.too_big) {
        reply = &ngx_smtp_ext_too_big;
        ctx->last_code = 552;

    } else if (ctx->bdat.reject && ctx->bdat.bare) {
        reply = &ngx_smtp_ext_bare;
        ctx->last_code = 550;

    } else if (ctx->bdat_reply.len) {
        ctx->last_code = ngx_atoi(ctx->bdat_reply.data, 3);
        ngx_mail_smtp_ext_out_backend(s, ctx->bdat_reply.data,
                                      ctx->bdat_reply.len);
        ngx_mail_smtp_ext_relay_close(s, 1);
        ngx_mail_smtp_ext_data_done(s);

        return ctx->state == ngx_smtp_ext_closing ? NGX_AGAIN : NGX_OK;

    } else {
        return ngx_mail_smtp_ext_data_failed(s);
    }

    ngx_mail_smtp_ext_relay_close(s, 1);
    ngx_mail_smtp_ext_data_done(s);

    return ngx_mail_smtp_ext_reply(s, reply);
}


/* the transaction fails now: no end of it may ever reach the backend */

static void
ngx_mail_smtp_ext_bdat_abort(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    ctx->data_failed = 1;
    ngx_mail_smtp_ext_relay_close(s, 0);
}
