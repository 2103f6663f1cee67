
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * libFuzzer target of the DATA scanner, the SMTP smuggling boundary.
 *
 * Input: 4 control octets, then the DATA stream.
 *   [0] bit 0: reject mode; bits 1-2: 0 no size limit, else a limit
 *   [1] the size limit: [1], or [1] * 64 when bits 1-2 are 3
 *   [2] output room: 4 + [2] % 64 octets
 *   [3] seed of the chunk split
 *
 * Checked: the same result for one chunk and for random chunks through a
 * small output buffer; no "\r\n.\r\n" in what the backend sees except the
 * final terminator of a good message; no bare CR or LF in normalize mode;
 * no write past out_last; in reject mode nothing written once bare is set
 * and the output a prefix of the input; agreement with a line-at-a-time
 * model of the scanner.
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ngx_smtp_core.h"


#define FUZZ_MAX_IN  65536


typedef struct {
    u_char    *out;
    size_t     out_len;
    size_t     in_used;
    int        rc;
    off_t      size;
    unsigned   bare;
    unsigned   too_big;
} result_t;


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


static void
fail(const char *what)
{
    fprintf(stderr, "fuzz_data: %s\n", what);
    abort();
}


static uint32_t
rnd(uint32_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;

    return *s;
}


/*
 * Runs the scanner over [in, in + n): chunk sizes from seed (0: one
 * chunk), output through a buffer of exactly room octets.
 */

static void
run(const u_char *in, size_t n, int reject, off_t max, uint32_t seed,
    size_t room, int verbatim, result_t *res)
{
    int              rc;
    size_t           pos, clen, iu, ou, stall;
    u_char          *chunk, *out;
    uint32_t         s;
    unsigned         was_bare;
    ngx_smtp_data_t  d;

    memset(&d, 0, sizeof(d));
    d.max_size = max;
    d.reject = reject;

    res->out = malloc(2 * n + 8);
    res->out_len = 0;
    res->rc = NGX_SMTP_AGAIN;

    out = malloc(room);
    s = seed | 1;
    pos = 0;
    stall = 0;

    while (pos < n) {
        clen = n - pos;

        if (seed) {
            switch (rnd(&s) % 4) {
            case 0:
                clen = 1;
                break;
            case 1:
                clen = 1 + rnd(&s) % 3;
                break;
            case 2:
                clen = 1 + rnd(&s) % 64;
                break;
            default:
                break;
            }

            if (clen > n - pos) {
                clen = n - pos;
            }
        }

        /* exactly the chunk and exactly room octets: ASan sees overruns */
        chunk = malloc(clen);
        memcpy(chunk, in + pos, clen);

        was_bare = d.bare;

        if (verbatim) {
            /* the zero-copy path: what passes unchanged, then the rest */

            iu = ngx_smtp_data_verbatim(&d, chunk, chunk + clen,
                                        rnd(&s) % 8);
            if (iu > clen) {
                fail("verbatim beyond the input");
            }

            if (iu) {
                memcpy(res->out + res->out_len, chunk, iu);
                res->out_len += iu;
                pos += iu;
                free(chunk);
                stall = 0;
                continue;
            }
        }

        rc = ngx_smtp_data_scan(&d, chunk, chunk + clen, out, out + room,
                                &iu, &ou);
        free(chunk);

        if (ou > room || iu > clen) {
            fail("used more than given");
        }

        if (reject && was_bare && ou) {
            fail("reject mode wrote after bare was set");
        }

        if (res->out_len + ou > 2 * n + 8) {
            fail("output grew beyond 2 * input");
        }

        memcpy(res->out + res->out_len, out, ou);
        res->out_len += ou;
        pos += iu;

        if (rc == NGX_SMTP_OK) {
            res->rc = rc;
            break;
        }

        if (rc != NGX_SMTP_AGAIN) {
            fail("unexpected return code");
        }

        if (iu == 0 && ou == 0) {
            if (++stall > 2) {
                fail("no progress");
            }

        } else {
            stall = 0;
        }
    }

    free(out);

    res->in_used = pos;
    res->size = d.size;
    res->bare = d.bare;
    res->too_big = d.too_big;
}


/* what the backend must receive, computed a line at a time */

static void
model(const u_char *in, size_t n, int reject, off_t max, result_t *res)
{
    int      clean, prev_clean, dot, bare;
    size_t   i, j, tl, slen, cut, len;
    u_char  *s;

    s = malloc(2 * n + 8);
    slen = 0;
    prev_clean = 1;
    bare = 0;
    cut = 0;
    i = 0;

    res->rc = NGX_SMTP_AGAIN;
    res->in_used = n;

    while (i < n) {
        j = i;

        while (j < n && in[j] != '\r' && in[j] != '\n') {
            j++;
        }

        dot = (j - i == 1 && in[i] == '.');

        if (j == n || (in[j] == '\r' && j + 1 == n)) {
            if (!dot) {
                memcpy(s + slen, in + i, j - i);
                slen += j - i;
            }

            break;
        }

        if (in[j] == '\r' && in[j + 1] == '\n') {
            clean = 1;
            tl = 2;

        } else {
            clean = 0;
            tl = 1;
        }

        if (dot && prev_clean && clean) {
            res->rc = NGX_SMTP_OK;
            res->in_used = j + 2;
            break;
        }

        if (!clean && !bare) {
            bare = 1;
            cut = slen + (dot ? 0 : j - i);
        }

        if (dot) {
            memcpy(s + slen, "..\r\n", 4);
            slen += 4;

        } else {
            memcpy(s + slen, in + i, j - i);
            slen += j - i;
            memcpy(s + slen, "\r\n", 2);
            slen += 2;
        }

        prev_clean = clean;
        i = j + tl;
    }

    res->size = slen;
    res->bare = bare;
    res->too_big = (max > 0 && (off_t) slen > max);

    len = slen;

    if (res->too_big && (size_t) max < len) {
        len = max;
    }

    if (reject && bare && cut < len) {
        len = cut;
    }

    if (res->rc == NGX_SMTP_OK && !res->too_big && !(reject && bare)) {
        memcpy(s + len, ".\r\n", 3);
        len += 3;
    }

    res->out = s;
    res->out_len = len;
}


static int
same(result_t *a, result_t *b)
{
    return a->rc == b->rc && a->out_len == b->out_len
           && memcmp(a->out, b->out, a->out_len) == 0
           && a->in_used == b->in_used && a->size == b->size
           && a->bare == b->bare && a->too_big == b->too_big;
}


static void
invariants(const u_char *in, result_t *r, int reject)
{
    int      good;
    size_t   i, end;
    u_char  *o;

    o = r->out;
    good = (r->rc == NGX_SMTP_OK && !r->too_big && !(reject && r->bare));

    /* the backend has seen "DATA\r\n": look at "\r\n" + output */
    end = r->out_len;

    if (good) {
        if (end < 3 || memcmp(o + end - 3, ".\r\n", 3) != 0
            || (end > 3 && (end < 5 || memcmp(o + end - 5, "\r\n", 2) != 0)))
        {
            fail("good message without CRLF.CRLF at its end");
        }

        end -= 3;
    }

    for (i = 0; i + 3 <= end; i++) {
        if (o[i] == '.' && o[i + 1] == '\r' && o[i + 2] == '\n'
            && (i == 0 || (i >= 2 && o[i - 2] == '\r' && o[i - 1] == '\n')))
        {
            fail("CRLF.CRLF inside the output");
        }
    }

    if (!reject) {
        /* the output of a cut-off message may stop after a CR */
        end = r->out_len;

        if (r->too_big && end && o[end - 1] == '\r') {
            end--;
        }

        for (i = 0; i < end; i++) {
            if (o[i] == '\r' && (i + 1 == end || o[i + 1] != '\n')) {
                fail("bare CR in normalize output");
            }

            if (o[i] == '\n' && (i == 0 || o[i - 1] != '\r')) {
                fail("bare LF in normalize output");
            }
        }

    } else {
        if (memcmp(o, in, r->out_len) != 0) {
            fail("reject output is not a prefix of the input");
        }
    }

    /* while output goes on, size is what was written but the final dot */
    if (!r->too_big && !(reject && r->bare)
        && (size_t) r->size != r->out_len - (good ? 3 : 0))
    {
        fail("size does not count the output");
    }

    if (r->too_big && (size_t) r->out_len > (size_t) r->size) {
        fail("a too big message wrote more than its size");
    }
}


/*
 * BDAT as DATA: the same output however the input is split and whatever
 * the room; the output is DATA whose only end of data is the last one,
 * with no bare CR or LF, and unstuffed it is the input with its line ends
 * made CRLF.
 */

static void
check_bdat(const u_char *in, size_t n, int reject, off_t max, uint32_t seed,
    size_t room)
{
    u_char           *o1, *o2, *p, *q, *un;
    size_t            l1, l2, i, used, clen, ul;
    uint32_t          s;
    ngx_smtp_bdat_t   b1, b2;

    o1 = malloc(4 * n + 8);
    o2 = malloc(4 * n + 8 + room);

    memset(&b1, 0, sizeof(b1));
    b1.reject = reject;
    b1.max_size = max;
    b2 = b1;

    l1 = ngx_smtp_bdat_convert(&b1, (u_char *) in, n, o1, 4 * n + 8, &used);

    if (used != n) {
        fail("bdat: input left with room enough");
    }

    l1 += ngx_smtp_bdat_end(&b1, o1 + l1);

    s = seed;
    l2 = 0;

    for (i = 0; i < n; i += used) {
        clen = 1 + rnd(&s) % 37;
        clen = clen > n - i ? n - i : clen;
        l2 += ngx_smtp_bdat_convert(&b2, (u_char *) in + i, clen, o2 + l2,
                                    room, &used);
        if (used == 0 && room >= NGX_SMTP_BDAT_GROWTH + 64) {
            fail("bdat: no progress");
        }
    }

    l2 += ngx_smtp_bdat_end(&b2, o2 + l2);

    if (l1 != l2 || memcmp(o1, o2, l1) != 0 || b1.bare != b2.bare
        || b1.too_big != b2.too_big || b1.size != b2.size
        || b1.size != (off_t) n)
    {
        fail("bdat: the split or the room changes the result");
    }

    if (!b1.too_big && !(reject && b1.bare)) {

        /* the end of data is the last 5 octets, and only there */

        if (l1 < 3 || memcmp(o1 + l1 - 3, ".\r\n", 3) != 0) {
            fail("bdat: no end of data");
        }

        for (p = o1; p + 5 <= o1 + l1 - 3; p++) {
            if (memcmp(p, "\r\n.\r\n", 5) == 0) {
                fail("bdat: an end of data before the end");
            }
        }

        if (l1 >= 3 && (l1 == 3 ? 0 : memcmp(o1, ".\r\n", 3) == 0)) {
            fail("bdat: an end of data at the start");
        }

        for (i = 0; i < l1; i++) {
            if ((o1[i] == '\r' && (i + 1 == l1 || o1[i + 1] != '\n'))
                || (o1[i] == '\n' && (i == 0 || o1[i - 1] != '\r')))
            {
                fail("bdat: a bare CR or LF in the output");
            }
        }

        /* unstuffed, it is the input with CRLF line ends */

        un = malloc(l1 + 1);
        ul = 0;
        q = o1;

        while (q < o1 + l1 - 3) {
            if (*q == '.' && (q == o1 || q[-1] == '\n')) {
                q++;
            }

            while (q < o1 + l1 - 3 && *q != '\n') {
                un[ul++] = *q++;
            }

            if (q < o1 + l1 - 3) {
                un[ul++] = *q++;
            }
        }

        for (i = 0, p = (u_char *) in; i < ul; i++) {
            if (un[i] == '\r' && i + 1 < ul && un[i + 1] == '\n') {
                /* CRLF: the input had CRLF, a bare CR or a bare LF */
                if (p < in + n && *p == '\r') {
                    p++;
                    if (p < in + n && *p == '\n') {
                        p++;
                    }

                } else if (p < in + n && *p == '\n') {
                    p++;
                }

                i++;
                continue;
            }

            if (p == in + n || *p != un[i]) {
                fail("bdat: unstuffed output is not the input");
            }

            p++;
        }

        if (p != in + n) {
            fail("bdat: input missing from the output");
        }

        free(un);
    }

    free(o1);
    free(o2);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int        reject;
    off_t      max;
    size_t     n, room;
    uint32_t   seed;
    result_t   one, many, small, ref, direct;
    const u_char  *in;

    if (size < 4 || size > FUZZ_MAX_IN) {
        return 0;
    }

    reject = data[0] & 1;

    switch ((data[0] >> 1) & 3) {
    case 0:
        max = 0;
        break;
    case 3:
        max = (off_t) data[1] * 64;
        break;
    default:
        max = data[1];
        break;
    }

    room = 4 + data[2] % 64;
    seed = data[3] * 2654435761u + 1;

    in = data + 4;
    n = size - 4;

    run(in, n, reject, max, 0, 2 * n + 8, 0, &one);
    run(in, n, reject, max, seed, 2 * n + 8, 0, &many);
    run(in, n, reject, max, seed, room, 0, &small);
    run(in, n, reject, max, seed, room, 1, &direct);
    model(in, n, reject, max, &ref);

    invariants(in, &one, reject);

    check_bdat(in, n, reject, max, seed, room);

    if (!same(&one, &many)) {
        fail("random chunks differ from one chunk");
    }

    if (!same(&one, &small)) {
        fail("a small output buffer changes the result");
    }

    if (!same(&one, &ref)) {
        fail("the scanner differs from the model");
    }

    if (!same(&one, &direct)) {
        fail("the zero-copy path changes the result");
    }

    free(one.out);
    free(many.out);
    free(small.out);
    free(ref.out);
    free(direct.out);

    return 0;
}
