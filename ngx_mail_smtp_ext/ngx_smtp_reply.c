
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE
#endif

#include <string.h>

#include "ngx_smtp_core.h"


#include "ngx_smtp_chars.h"


typedef struct {
    const char             *name;
    size_t                  len;
    unsigned                flag;
} ngx_smtp_keyword_t;


static int ngx_smtp_word_eq(u_char *p, size_t len, const char *s, size_t n);
static unsigned ngx_smtp_lookup(ngx_smtp_keyword_t *kw, u_char *p,
    size_t len);
static u_char *ngx_smtp_enhanced_code(u_char *p, u_char *last);
static u_char *ngx_smtp_copy_text(u_char *d, u_char *p, u_char *last);


static ngx_smtp_keyword_t  ngx_smtp_caps[] = {
    { "pipelining", 10, NGX_SMTP_CAP_PIPELINING },
    { "size", 4, NGX_SMTP_CAP_SIZE },
    { "8bitmime", 8, NGX_SMTP_CAP_8BITMIME },
    { "smtputf8", 8, NGX_SMTP_CAP_SMTPUTF8 },
    { "starttls", 8, NGX_SMTP_CAP_STARTTLS },
    { "xclient", 7, NGX_SMTP_CAP_XCLIENT },
    { "enhancedstatuscodes", 19, NGX_SMTP_CAP_ENHANCED },
    { "chunking", 8, NGX_SMTP_CAP_CHUNKING },
    { "dsn", 3, NGX_SMTP_CAP_DSN },
    { "auth", 4, NGX_SMTP_CAP_AUTH },
    { NULL, 0, 0 }
};


static ngx_smtp_keyword_t  ngx_smtp_xclient_attrs[] = {
    { "name", 4, NGX_SMTP_XCLIENT_NAME },
    { "addr", 4, NGX_SMTP_XCLIENT_ADDR },
    { "port", 4, NGX_SMTP_XCLIENT_PORT },
    { "proto", 5, NGX_SMTP_XCLIENT_PROTO },
    { "helo", 4, NGX_SMTP_XCLIENT_HELO },
    { "login", 5, NGX_SMTP_XCLIENT_LOGIN },
    { "reverse_name", 12, NGX_SMTP_XCLIENT_REVERSE_NAME },
    { "destaddr", 8, NGX_SMTP_XCLIENT_DESTADDR },
    { "destport", 8, NGX_SMTP_XCLIENT_DESTPORT },
    { NULL, 0, 0 }
};


int
ngx_smtp_parse_reply(u_char *p, u_char *last, size_t max,
    ngx_smtp_reply_t *r)
{
    u_char    *s, *lf;
    size_t     n;
    unsigned   code;

    for ( ;; ) {
        if (r->scanned > (size_t) (last - p)) {
            return NGX_SMTP_ERROR;
        }

        s = p + r->scanned;

        lf = memchr(s, '\n', last - s);

        if (lf == NULL) {
            /* even a CRLF right now would make the line too long */
            return (size_t) (last - s) >= max ? NGX_SMTP_ERROR
                                               : NGX_SMTP_AGAIN;
        }

        n = lf - s + 1;

        /* the shortest line is "250" CRLF */
        if (n > max || n < 5 || lf[-1] != '\r'
            || memchr(s, '\0', n) != NULL)
        {
            return NGX_SMTP_ERROR;
        }

        if (s[0] < '2' || s[0] > '5'
            || !ngx_smtp_digit(s[1]) || !ngx_smtp_digit(s[2]))
        {
            return NGX_SMTP_ERROR;
        }

        code = (s[0] - '0') * 100 + (s[1] - '0') * 10 + (s[2] - '0');

        if (r->lines && code != r->code) {
            return NGX_SMTP_ERROR;
        }

        r->code = code;
        r->lines++;
        r->scanned += n;

        if (n == 5 || s[3] == ' ') {
            r->len = r->scanned;
            return NGX_SMTP_OK;
        }

        if (s[3] != '-') {
            return NGX_SMTP_ERROR;
        }
    }
}


void
ngx_smtp_parse_ehlo(u_char *p, size_t len, ngx_smtp_ehlo_t *ehlo)
{
    u_char    *last, *lf, *next, *e, *s, *w;
    off_t      size;
    unsigned   first, cap;

    memset(ehlo, 0, sizeof(ngx_smtp_ehlo_t));

    last = p + len;
    first = 1;

    for ( /* void */ ; p < last; p = next) {

        lf = memchr(p, '\n', last - p);
        next = lf ? lf + 1 : last;
        e = lf ? lf : last;

        if (e > p && e[-1] == '\r') {
            e--;
        }

        /* the first line is the backend's name and greeting */
        if (first) {
            first = 0;
            continue;
        }

        if (e - p < 5) {
            continue;
        }

        /* the keyword; "AUTH=LOGIN" is an old form of "AUTH LOGIN" */

        s = p + 4;
        w = s;

        while (s < e && *s != ' ' && *s != '=') {
            s++;
        }

        cap = ngx_smtp_lookup(ngx_smtp_caps, w, s - w);
        ehlo->caps |= cap;

        if (cap == NGX_SMTP_CAP_SIZE) {
            while (s < e && *s == ' ') {
                s++;
            }

            size = 0;

            while (s < e && ngx_smtp_digit(*s)) {
                if (size > (NGX_SMTP_OFF_T_MAX - (*s - '0')) / 10) {
                    /* beyond any message: the same as no limit */
                    size = 0;
                    break;
                }

                size = size * 10 + (*s - '0');
                s++;
            }

            ehlo->size = size;

        } else if (cap == NGX_SMTP_CAP_XCLIENT) {
            for ( ;; ) {
                while (s < e && *s == ' ') {
                    s++;
                }

                if (s == e) {
                    break;
                }

                w = s;

                while (s < e && *s != ' ') {
                    s++;
                }

                ehlo->xclient |= ngx_smtp_lookup(ngx_smtp_xclient_attrs,
                                                 w, s - w);
            }
        }
    }
}


size_t
ngx_smtp_copy_reply(u_char *dst, u_char *p, size_t len)
{
    u_char  *d, *last, *lf, *next, *e, *s;

    d = dst;
    last = p + len;

    for ( /* void */ ; p < last; p = next) {

        lf = memchr(p, '\n', last - p);
        next = lf ? lf + 1 : last;
        e = lf ? lf : last;

        if (lf && e > p && e[-1] == '\r') {
            e--;
        }

        if (e - p >= 3
            && ngx_smtp_digit(p[0]) && ngx_smtp_digit(p[1])
            && ngx_smtp_digit(p[2])
            && (e - p == 3 || p[3] == ' ' || p[3] == '-'))
        {
            d[0] = p[0];
            d[1] = p[1];
            d[2] = p[2];
            d += 3;

            if (e - p == 3) {
                /* "250" CRLF becomes "250 2.0.0" CRLF */
                *d++ = ' ';
                *d++ = p[0];
                memcpy(d, ".0.0", 4);
                d += 4;

            } else {
                *d++ = p[3];
                s = p + 4;

                if (ngx_smtp_enhanced_code(s, e) == NULL) {
                    *d++ = p[0];
                    memcpy(d, ".0.0", 4);
                    d += 4;

                    if (s < e) {
                        *d++ = ' ';
                    }
                }

                d = ngx_smtp_copy_text(d, s, e);
            }

        } else {
            d = ngx_smtp_copy_text(d, p, e);
        }

        /* the line's own CRLF (or LF) */
        memcpy(d, e, next - e);
        d += next - e;
    }

    return d - dst;
}


size_t
ngx_smtp_shorten_reply(u_char *dst, size_t size, u_char *p, size_t len)
{
    u_char  *d, *last, *final, *lf, *next;
    size_t   n, budget;

    if (size < NGX_SMTP_SHORT_REPLY_MIN || len < 5) {
        return 0;
    }

    last = p + len;

    /* the final line starts after the last LF before its own CRLF */

    for (final = last - 2; final > p && final[-1] != '\n'; final--) {
        /* void */
    }

    d = dst;
    n = last - final;

    if (n + 6 > size) {
        /* the final line alone is too long: its head, a CRLF of our own */

        n = size - 8;
        d += ngx_smtp_copy_reply(d, final, n);
        *d++ = '\r';
        *d++ = '\n';

        return d - dst;
    }

    /* leading lines while they fit beside the final one, whole or none */

    budget = size - (n + 6);

    for ( /* void */ ; p < final; p = next) {
        lf = memchr(p, '\n', final - p);
        next = lf ? lf + 1 : final;

        if ((size_t) (next - p) + 6 > budget) {
            break;
        }

        n = ngx_smtp_copy_reply(d, p, next - p);
        d += n;
        budget -= n;
    }

    d += ngx_smtp_copy_reply(d, final, last - final);

    return d - dst;
}


size_t
ngx_smtp_xtext_encode(u_char *dst, u_char *src, size_t len)
{
    u_char         c, *d;
    size_t         n, i;
    static u_char  hex[] = "0123456789ABCDEF";

    if (dst == NULL) {
        n = len;

        for (i = 0; i < len; i++) {
            c = src[i];

            if (c == '+' || c == '=' || c < '!' || c > '~') {
                n += 2;
            }
        }

        return n;
    }

    d = dst;

    for (i = 0; i < len; i++) {
        c = src[i];

        if (c == '+' || c == '=' || c < '!' || c > '~') {
            *d++ = '+';
            *d++ = hex[c >> 4];
            *d++ = hex[c & 0x0f];

        } else {
            *d++ = c;
        }
    }

    return d - dst;
}


static int
ngx_smtp_word_eq(u_char *p, size_t len, const char *s, size_t n)
{
    size_t  i;

    if (len != n) {
        return 0;
    }

    for (i = 0; i < n; i++) {
        if (ngx_smtp_lc(p[i]) != (u_char) s[i]) {
            return 0;
        }
    }

    return 1;
}


static unsigned
ngx_smtp_lookup(ngx_smtp_keyword_t *kw, u_char *p, size_t len)
{
    for ( /* void */ ; kw->name; kw++) {
        if (ngx_smtp_word_eq(p, len, kw->name, kw->len)) {
            return kw->flag;
        }
    }

    return 0;
}


/*
 * An RFC 3463 code "d.ddd.ddd" followed by a space or the end of the
 * line; returns the end of the code or NULL.
 */

static u_char *
ngx_smtp_enhanced_code(u_char *p, u_char *last)
{
    size_t  i, n;

    if (p == last || !ngx_smtp_digit(*p)) {
        return NULL;
    }

    p++;

    for (i = 0; i < 2; i++) {
        if (p == last || *p != '.') {
            return NULL;
        }

        p++;

        for (n = 0; p < last && ngx_smtp_digit(*p); n++) {
            p++;
        }

        if (n == 0 || n > 3) {
            return NULL;
        }
    }

    if (p < last && *p != ' ') {
        return NULL;
    }

    return p;
}


/* a line's text, control octets (a stray CR too) replaced with '?' */

static u_char *
ngx_smtp_copy_text(u_char *d, u_char *p, u_char *last)
{
    while (p < last) {
        *d++ = ngx_smtp_ctl(*p) ? '?' : *p;
        p++;
    }

    return d;
}
