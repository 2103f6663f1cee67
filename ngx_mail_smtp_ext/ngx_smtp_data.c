
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * The DATA scanner.  It is the SMTP smuggling boundary: the backend must
 * never see an end of data ("\r\n.\r\n" on the wire) that the scanner did
 * not see.  Input lines end with CRLF, a bare LF, or a bare CR (a CR not
 * followed by LF); every output line ends with CRLF.  A line is written
 * as it came (dot-stuffing included) except for one case: a line that is
 * "." alone but is not the end of data, because it started after a bare
 * line ending or ends with one, is written as "..", which the backend
 * reads as a line holding a single dot.
 *
 * A line start state remembers whether the previous line ended with a
 * real CRLF ("clean") or a bare ending, and octets whose meaning depends
 * on what follows (".", CR, ".\r") are held in the state rather than
 * written, so that every split of the input across calls gives the same
 * output.  Octets other than CR and LF, NUL included, are passed through:
 * the content is the backend's business.
 */


#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE
#endif

#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "ngx_smtp_core.h"


enum {
    ngx_smtp_data_start = 0,        /* line start after a real CRLF */
    ngx_smtp_data_start_bare,       /* line start after a bare ending */
    ngx_smtp_data_text,             /* inside a line */
    ngx_smtp_data_cr,               /* CR held */
    ngx_smtp_data_dot,              /* "." held, clean line start */
    ngx_smtp_data_dot_bare,         /* "." held, line start after bare */
    ngx_smtp_data_dot_cr,           /* ".\r" held, clean line start */
    ngx_smtp_data_dot_cr_bare,      /* ".\r" held, line start after bare */
    ngx_smtp_data_done
};


/* the most a single step of the state machine writes: "..\r\n" */
#define NGX_SMTP_DATA_STEP  4


static u_char *ngx_smtp_data_emit(ngx_smtp_data_t *d, u_char *o,
    u_char *src, size_t n);
static u_char *ngx_smtp_data_run(ngx_smtp_data_t *d, u_char *p,
    u_char *last, u_char **out, u_char *out_last, int writing);
static u_char *ngx_smtp_data_safe(u_char *p, u_char *end,
    unsigned *line_start);
static u_char *ngx_smtp_data_eol(u_char *p, u_char *end);


static u_char  ngx_smtp_crlf[] = "\r\n";
static u_char  ngx_smtp_dotdot[] = "..\r\n";
static u_char  ngx_smtp_dot[] = ".\r\n";


int
ngx_smtp_data_scan(ngx_smtp_data_t *d, u_char *in, u_char *in_last,
    u_char *out, u_char *out_last, size_t *in_used, size_t *out_used)
{
    int      rc, writing;
    u_char   c, *p, *o;

    p = in;
    o = out;
    rc = NGX_SMTP_AGAIN;

    if (d->state == ngx_smtp_data_done) {
        rc = NGX_SMTP_OK;
        goto done;
    }

    while (p < in_last) {

        writing = !(d->too_big || (d->reject && d->bare));

        if (writing && (size_t) (out_last - o) < NGX_SMTP_DATA_STEP) {
            break;
        }

        c = *p;

        switch (d->state) {

        case ngx_smtp_data_start:
        case ngx_smtp_data_start_bare:

            if (c == '.') {
                d->state = (d->state == ngx_smtp_data_start)
                           ? ngx_smtp_data_dot : ngx_smtp_data_dot_bare;
                p++;
                break;
            }

            if (c == '\r') {
                d->state = ngx_smtp_data_cr;
                p++;
                break;
            }

            if (c == '\n') {
                d->bare = 1;
                o = ngx_smtp_data_emit(d, o, ngx_smtp_crlf, 2);
                d->state = ngx_smtp_data_start_bare;
                p++;
                break;
            }

            d->state = ngx_smtp_data_text;
            p = ngx_smtp_data_run(d, p, in_last, &o, out_last, writing);
            break;

        case ngx_smtp_data_text:

            if (c == '\r') {
                d->state = ngx_smtp_data_cr;
                p++;
                break;
            }

            if (c == '\n') {
                d->bare = 1;
                o = ngx_smtp_data_emit(d, o, ngx_smtp_crlf, 2);
                d->state = ngx_smtp_data_start_bare;
                p++;
                break;
            }

            p = ngx_smtp_data_run(d, p, in_last, &o, out_last, writing);
            break;

        case ngx_smtp_data_cr:

            if (c == '\n') {
                o = ngx_smtp_data_emit(d, o, ngx_smtp_crlf, 2);
                d->state = ngx_smtp_data_start;
                p++;
                break;
            }

            /* a bare CR; c starts the next line */
            d->bare = 1;
            o = ngx_smtp_data_emit(d, o, ngx_smtp_crlf, 2);
            d->state = ngx_smtp_data_start_bare;
            break;

        case ngx_smtp_data_dot:
        case ngx_smtp_data_dot_bare:

            if (c == '\r') {
                d->state = (d->state == ngx_smtp_data_dot)
                           ? ngx_smtp_data_dot_cr : ngx_smtp_data_dot_cr_bare;
                p++;
                break;
            }

            if (c == '\n') {
                /* "." alone with a bare LF: never "\r\n.\r\n" out */
                d->bare = 1;
                d->dots++;
                o = ngx_smtp_data_emit(d, o, ngx_smtp_dotdot, 4);
                d->state = ngx_smtp_data_start_bare;
                p++;
                break;
            }

            /* a dot-stuffed or ordinary line, written as it came */
            d->dots++;
            o = ngx_smtp_data_emit(d, o, ngx_smtp_dot, 1);
            d->state = ngx_smtp_data_text;
            break;

        case ngx_smtp_data_dot_cr:

            if (c == '\n') {
                /* CRLF "." CRLF: the end of data */
                p++;

                if (writing) {
                    memcpy(o, ngx_smtp_dot, 3);
                    o += 3;
                }

                d->state = ngx_smtp_data_done;
                rc = NGX_SMTP_OK;
                goto done;
            }

            d->bare = 1;
            d->dots++;
            o = ngx_smtp_data_emit(d, o, ngx_smtp_dotdot, 4);
            d->state = ngx_smtp_data_start_bare;
            break;

        case ngx_smtp_data_dot_cr_bare:

            /* "." after a bare ending is never the end of data */

            if (c == '\n') {
                d->dots++;
                o = ngx_smtp_data_emit(d, o, ngx_smtp_dotdot, 4);
                d->state = ngx_smtp_data_start;
                p++;
                break;
            }

            d->bare = 1;
            d->dots++;
            o = ngx_smtp_data_emit(d, o, ngx_smtp_dotdot, 4);
            d->state = ngx_smtp_data_start_bare;
            break;

        default:
            /* a corrupted state: stop rather than guess */
            d->too_big = 1;
            d->bare = 1;
            d->state = ngx_smtp_data_text;
            break;
        }
    }

done:

    *in_used = p - in;
    *out_used = o - out;

    return rc;
}


size_t
ngx_smtp_data_verbatim(ngx_smtp_data_t *d, u_char *in, u_char *in_last,
    size_t min)
{
    u_char    *q, *end;
    size_t     n;
    unsigned   state, line_start;

    if (d->too_big || (d->reject && d->bare) || in == in_last) {
        return 0;
    }

    switch (d->state) {

    case ngx_smtp_data_text:
        break;

    case ngx_smtp_data_start:
    case ngx_smtp_data_start_bare:
        /* a line start passes through only with an ordinary octet */
        if (*in == '.' || *in == '\r' || *in == '\n') {
            return 0;
        }

        break;

    default:
        /* an octet is held */
        return 0;
    }

    n = in_last - in;

    if (d->max_size > 0) {
        if (d->size >= d->max_size) {
            return 0;
        }

        if ((off_t) n > d->max_size - d->size) {
            n = (size_t) (d->max_size - d->size);
        }
    }

    /* the same runs as ngx_smtp_data_run() takes */

    end = in + n;
    q = ngx_smtp_data_safe(in, end, &line_start);
    state = line_start ? ngx_smtp_data_start : ngx_smtp_data_text;

    n = q - in;

    if (n == 0 || n < min) {
        return 0;
    }

    d->state = state;
    d->size += n;

    return n;
}


/*
 * Counts n octets of output and writes them unless output has stopped;
 * output stops exactly at max_size octets, so that the result does not
 * depend on how the input was split.
 */

static u_char *
ngx_smtp_data_emit(ngx_smtp_data_t *d, u_char *o, u_char *src, size_t n)
{
    size_t  w;

    w = (d->too_big || (d->reject && d->bare)) ? 0 : n;

    if (d->max_size > 0 && !d->too_big && d->size + (off_t) n > d->max_size)
    {
        if (w) {
            w = (size_t) (d->max_size - d->size);
        }

        d->too_big = 1;
    }

    if (w) {
        memcpy(o, src, w);
        o += w;
    }

    d->size += n;

    return o;
}


/*
 * The fast path: from an ordinary octet inside a line, takes the run
 * that passes unchanged (see ngx_smtp_data_safe()) and copies it at once;
 * the state machine does the rest.
 */

static u_char *
ngx_smtp_data_run(ngx_smtp_data_t *d, u_char *p, u_char *last,
    u_char **out, u_char *out_last, int writing)
{
    u_char    *q;
    size_t     n;
    unsigned   line_start;

    n = last - p;

    if (writing && n > (size_t) (out_last - *out)) {
        n = out_last - *out;
    }

    q = ngx_smtp_data_safe(p, p + n, &line_start);

    if (line_start) {
        d->state = ngx_smtp_data_start;
    }

    *out = ngx_smtp_data_emit(d, *out, p, q - p);

    return q;
}


/*
 * The anti-smuggling boundary, one implementation for the copying and
 * the zero-copy paths: from an ordinary octet inside a line, the longest
 * run of text and CRLF-terminated lines whose next line starts with an
 * ordinary octet.  It stops before a CR that is not followed by LF in the
 * run, a bare LF, or after a CRLF that is followed by ".", CR or LF or
 * ends the run (*line_start is then set).
 */

static u_char *
ngx_smtp_data_safe(u_char *p, u_char *end, unsigned *line_start)
{
    u_char  *q;

    *line_start = 0;
    q = p;

    for ( ;; ) {
        q = ngx_smtp_data_eol(q, end);

        if (q == end || *q == '\n') {
            /* the end of the run, or a bare LF */
            return q;
        }

        if (q + 1 == end || q[1] != '\n') {
            /* a bare CR, or a CR whose LF is not in this run */
            return q;
        }

        q += 2;

        if (q == end || *q == '.' || *q == '\r' || *q == '\n') {
            *line_start = 1;
            return q;
        }
    }
}


/*
 * The first CR or LF in [p, end), or end: one pass over the text, 16
 * octets at a time where SSE2 is there (every x86-64).
 */

static u_char *
ngx_smtp_data_eol(u_char *p, u_char *end)
{
#if defined(__SSE2__)
    int      m;
    __m128i  v, cr, lf;

    cr = _mm_set1_epi8('\r');
    lf = _mm_set1_epi8('\n');

    while (end - p >= 16) {
        v = _mm_loadu_si128((const __m128i *) (void *) p);
        m = _mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(v, cr),
                                           _mm_cmpeq_epi8(v, lf)));
        if (m) {
            return p + __builtin_ctz((unsigned) m);
        }

        p += 16;
    }
#endif

    while (p < end && *p != '\r' && *p != '\n') {
        p++;
    }

    return p;
}


/* BDAT as DATA */

#define NGX_SMTP_BDAT_LS   0    /* at a line start */
#define NGX_SMTP_BDAT_TX   1    /* inside a line */
#define NGX_SMTP_BDAT_CR   2    /* a CR, its LF not seen yet */


size_t
ngx_smtp_bdat_convert(ngx_smtp_bdat_t *b, u_char *in, size_t len,
    u_char *out, size_t room, size_t *in_used)
{
    u_char    c, *p, *last, *o, *q, *stop;
    unsigned  writing;

    p = in;
    last = in + len;
    o = out;

    for ( ;; ) {

        writing = (out != NULL && !b->too_big && !(b->reject && b->bare));

        if (p == last
            || (writing && room - (size_t) (o - out) < NGX_SMTP_BDAT_GROWTH))
        {
            break;
        }

        if (b->max_size && b->size >= b->max_size && !b->too_big) {
            b->too_big = 1;
            continue;
        }

        c = *p;

        if (b->state == NGX_SMTP_BDAT_CR) {

            if (c == '\n') {
                p++;
                b->size++;
                b->state = NGX_SMTP_BDAT_LS;

                if (writing) {
                    *o++ = '\r'; *o++ = '\n';
                }

                continue;
            }

            /* a bare CR: a line end; c starts the next line */

            b->bare = 1;
            b->state = NGX_SMTP_BDAT_LS;

            if (writing && !b->reject) {
                *o++ = '\r'; *o++ = '\n';
            }

            continue;
        }

        if (c == '\r') {
            p++;
            b->size++;
            b->state = NGX_SMTP_BDAT_CR;
            continue;
        }

        if (c == '\n') {
            p++;
            b->size++;
            b->bare = 1;
            b->state = NGX_SMTP_BDAT_LS;

            if (writing && !b->reject) {
                *o++ = '\r'; *o++ = '\n';
            }

            continue;
        }

        if (b->state == NGX_SMTP_BDAT_LS && c == '.') {
            p++;
            b->size++;
            b->state = NGX_SMTP_BDAT_TX;

            if (writing) {
                *o++ = '.'; *o++ = '.';
            }

            continue;
        }

        /* a run of text up to the next CR or LF, within room and size */

        stop = last;

        if (writing && (size_t) (stop - p) > room - (o - out) - 2) {
            stop = p + (room - (o - out) - 2);
        }

        if (b->max_size && !b->too_big && stop - p > b->max_size - b->size) {
            stop = p + (b->max_size - b->size);
        }

        q = ngx_smtp_data_eol(p, stop);

        if (q == p) {
            /* the size limit falls here */
            continue;
        }

        if (writing) {
            memcpy(o, p, q - p);
            o += q - p;
        }

        b->size += q - p;
        b->state = NGX_SMTP_BDAT_TX;
        p = q;
    }

    *in_used = p - in;

    return o - out;
}


size_t
ngx_smtp_bdat_end(ngx_smtp_bdat_t *b, u_char *out)
{
    u_char  *o;

    o = out;

    if (b->state == NGX_SMTP_BDAT_CR) {
        /* a message that ends in a bare CR */
        b->bare = 1;
    }

    if (b->too_big || (b->reject && b->bare)) {
        return 0;
    }

    if (b->state != NGX_SMTP_BDAT_LS) {
        *o++ = '\r'; *o++ = '\n';
    }

    *o++ = '.'; *o++ = '\r'; *o++ = '\n';

    b->state = NGX_SMTP_BDAT_LS;

    return o - out;
}
