
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * libFuzzer target of the command and reply parsers.
 *
 * Input: 1 control octet (the line limit: 512, or 8 + octet when odd),
 * then text that is split into command lines, parsed as backend replies,
 * copied as a reply and xtext-encoded.
 *
 * Checked beyond memory safety: results point inside the line; a MAIL or
 * RCPT path, put back into a command, parses to the same path (nothing
 * can be smuggled into the backend's command); the verb is caseless; the
 * reply parser gives the same answer byte by byte as at once; a copied
 * reply stays within len + 6 * lines, has no control octets but CRLF,
 * and parses again with the same code and lines; xtext decodes back.
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ngx_smtp_core.h"


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


static void
fail(const char *what)
{
    fprintf(stderr, "fuzz_parse: %s\n", what);
    abort();
}


static void
inside(ngx_smtp_str_t *s, u_char *p, size_t len)
{
    if (s->len && (s->data < p || s->data + s->len > p + len)) {
        fail("a result points outside the line");
    }
}


static void
check_path(ngx_smtp_cmd_t *cmd)
{
    int             rc;
    size_t          n;
    u_char         *buf;
    ngx_smtp_cmd_t  again;

    buf = malloc(cmd->path.len + 32);

    if (cmd->cmd == NGX_SMTP_CMD_MAIL) {
        n = 11;
        memcpy(buf, "MAIL FROM:<", n);

    } else {
        n = 9;
        memcpy(buf, "RCPT TO:<", n);
    }

    memcpy(buf + n, cmd->path.data, cmd->path.len);
    n += cmd->path.len;
    buf[n++] = '>';

    if (cmd->cmd == NGX_SMTP_CMD_MAIL && cmd->utf8_path) {
        memcpy(buf + n, " SMTPUTF8", 9);
        n += 9;
    }

    rc = ngx_smtp_parse_command(buf, n, &again);

    if (rc != NGX_SMTP_OK || again.path.len != cmd->path.len
        || memcmp(again.path.data, cmd->path.data, cmd->path.len) != 0
        || again.utf8_path != cmd->utf8_path
        || again.null_path != cmd->null_path)
    {
        fail("a path does not survive being sent on");
    }

    free(buf);
}


static void
check_command(u_char *line, size_t len)
{
    int             rc, rc2;
    size_t          i;
    u_char         *copy;
    ngx_smtp_cmd_t  cmd, cmd2;

    /* exactly the line's octets, so ASan sees any overread */
    copy = malloc(len ? len : 1);
    memcpy(copy, line, len);

    rc = ngx_smtp_parse_command(copy, len, &cmd);

    if (rc < NGX_SMTP_OK || rc > NGX_SMTP_E_UTF8) {
        fail("unexpected return code");
    }

    if (rc == NGX_SMTP_OK) {
        inside(&cmd.arg, copy, len);
        inside(&cmd.path, copy, len);
        inside(&cmd.params, copy, len);
        inside(&cmd.auth, copy, len);
        inside(&cmd.mech, copy, len);
        inside(&cmd.initial, copy, len);

        for (i = 0; i < cmd.arg.len; i++) {
            if (cmd.arg.data[i] < 0x20 || cmd.arg.data[i] == 0x7f) {
                fail("a control octet in an accepted argument");
            }
        }

        switch (cmd.cmd) {

        case NGX_SMTP_CMD_HELO:
        case NGX_SMTP_CMD_EHLO:
            if (cmd.arg.len == 0) {
                fail("HELO without an argument");
            }
            break;

        case NGX_SMTP_CMD_MAIL:
            if (cmd.utf8_path && !cmd.smtputf8) {
                fail("8-bit MAIL path without SMTPUTF8");
            }

            check_path(&cmd);
            break;

        case NGX_SMTP_CMD_RCPT:
            if (cmd.null_path || cmd.params.len) {
                fail("RCPT with <> or parameters");
            }

            check_path(&cmd);
            break;

        case NGX_SMTP_CMD_AUTH:
            if (cmd.mech.len == 0) {
                fail("AUTH without a mechanism");
            }
            break;

        default:
            break;
        }

    } else if (rc == NGX_SMTP_E_UNKNOWN && cmd.cmd != NGX_SMTP_CMD_UNKNOWN) {
        fail("unknown verb with a command");
    }

    /* verbs are caseless */
    for (i = 0; i < len && copy[i] != ' '; i++) {
        if ((copy[i] | 0x20) >= 'a' && (copy[i] | 0x20) <= 'z') {
            copy[i] ^= 0x20;
        }
    }

    rc2 = ngx_smtp_parse_command(copy, len, &cmd2);

    if (rc2 != rc || cmd2.cmd != cmd.cmd) {
        fail("the verb's case changed the result");
    }

    free(copy);
}


static void
check_lines(const u_char *data, size_t size, size_t max)
{
    int              rc;
    u_char          *buf, *p, *last;
    ngx_smtp_line_t  line;

    buf = malloc(size ? size : 1);
    memcpy(buf, data, size);

    p = buf;
    last = buf + size;

    while (p < last) {
        rc = ngx_smtp_find_line(p, last, max, &line);

        if (rc == NGX_SMTP_AGAIN) {
            if ((size_t) (last - p) >= max || memchr(p, '\n', last - p)) {
                fail("AGAIN with a full line");
            }

            /* what a client that closes leaves: parse it anyway */
            check_command(p, last - p);
            break;
        }

        if (line.consumed == 0 || line.consumed > (size_t) (last - p)) {
            fail("bad consumed");
        }

        if (rc == NGX_SMTP_OK) {
            if (p[line.consumed - 1] != '\n' || line.len + 2 > max
                || memchr(p, '\n', line.len) != NULL)
            {
                fail("bad line");
            }

            check_command(line.start, line.len);

        } else if (rc != NGX_SMTP_LINE_TOO_LONG) {
            fail("unexpected return code");
        }

        p += line.consumed;
    }

    free(buf);
}


/*
 * Shortened to any size, a reply stays one well-formed reply with the
 * same code that fits the size, its final line last.
 */

static void
check_shorten(u_char *p, size_t len, ngx_smtp_reply_t *r)
{
    int               rc;
    size_t            size, n;
    u_char           *dst;
    ngx_smtp_reply_t  r2;

    for (size = 0; size < len + 6 * r->lines + 8; size += 1 + size / 4) {
        dst = malloc(size + 1);
        n = ngx_smtp_shorten_reply(dst, size, p, len);

        if (size < NGX_SMTP_SHORT_REPLY_MIN) {
            if (n != 0) {
                fail("shorten_reply wrote into a too small buffer");
            }

            free(dst);
            continue;
        }

        if (n > size) {
            fail("shorten_reply wrote past its size");
        }

        memset(&r2, 0, sizeof(r2));
        rc = ngx_smtp_parse_reply(dst, dst + n, (size_t) -1, &r2);

        if (rc != NGX_SMTP_OK || r2.len != n || r2.code != r->code
            || r2.lines > r->lines)
        {
            fail("a shortened reply is not one reply of the same code");
        }

        free(dst);
    }
}


static void
check_copy(u_char *p, size_t len, size_t lines, ngx_smtp_reply_t *r)
{
    int               rc;
    size_t            n, i;
    u_char           *dst;
    ngx_smtp_reply_t  r2;

    dst = malloc(len + 6 * lines + 1);
    n = ngx_smtp_copy_reply(dst, p, len);

    if (n > len + 6 * lines) {
        fail("copy_reply wrote more than len + 6 * lines");
    }

    for (i = 0; i < n; i++) {
        if ((dst[i] < 0x20 && dst[i] != '\r' && dst[i] != '\n')
            || dst[i] == 0x7f)
        {
            fail("a control octet in a copied reply");
        }

        if (r && dst[i] == '\r' && (i + 1 == n || dst[i + 1] != '\n')) {
            fail("a stray CR in a copied reply");
        }
    }

    if (r) {
        memset(&r2, 0, sizeof(r2));
        rc = ngx_smtp_parse_reply(dst, dst + n, (size_t) -1, &r2);

        if (rc != NGX_SMTP_OK || r2.len != n || r2.code != r->code
            || r2.lines != r->lines)
        {
            fail("a copied reply does not parse as the original");
        }

        check_shorten(p, len, r);
    }

    free(dst);
}


static void
check_replies(const u_char *data, size_t size, size_t max)
{
    int               rc, rc2;
    size_t            i;
    u_char           *buf, *p, *last;
    ngx_smtp_ehlo_t   ehlo;
    ngx_smtp_reply_t  r, r2;

    buf = malloc(size ? size : 1);
    memcpy(buf, data, size);

    p = buf;
    last = buf + size;

    while (p < last) {
        memset(&r, 0, sizeof(r));
        rc = ngx_smtp_parse_reply(p, last, max, &r);

        /* the same answer when the octets arrive one at a time */
        memset(&r2, 0, sizeof(r2));
        rc2 = NGX_SMTP_AGAIN;

        for (i = 1; i <= (size_t) (last - p) && rc2 == NGX_SMTP_AGAIN; i++) {
            rc2 = ngx_smtp_parse_reply(p, p + i, max, &r2);
        }

        if (rc2 != rc || (rc == NGX_SMTP_OK && (r2.len != r.len
                                                || r2.lines != r.lines
                                                || r2.code != r.code)))
        {
            fail("byte by byte differs from at once");
        }

        if (rc != NGX_SMTP_OK) {
            break;
        }

        if (r.len == 0 || r.len > (size_t) (last - p) || r.lines == 0
            || r.code < 200 || r.code > 599
            || p[r.len - 1] != '\n' || p[r.len - 2] != '\r')
        {
            fail("bad reply");
        }

        check_copy(p, r.len, r.lines, &r);

        ngx_smtp_parse_ehlo(p, r.len, &ehlo);

        if (ehlo.size < 0) {
            fail("negative SIZE");
        }

        p += r.len;
    }

    free(buf);
}


static void
check_xtext(const u_char *data, size_t size)
{
    size_t   n, m, i, j;
    u_char  *dst, *src, c;

    src = malloc(size ? size : 1);
    memcpy(src, data, size);

    n = ngx_smtp_xtext_encode(NULL, src, size);
    dst = malloc(n ? n : 1);
    m = ngx_smtp_xtext_encode(dst, src, size);

    if (m != n) {
        fail("xtext length differs");
    }

    for (i = 0, j = 0; i < m; j++) {
        if (dst[i] < '!' || dst[i] > '~' || dst[i] == '=') {
            fail("xtext output not xchar");
        }

        if (dst[i] == '+') {
            if (i + 2 >= m) {
                fail("truncated xtext hexchar");
            }

            c = (u_char) ((dst[i + 1] <= '9' ? dst[i + 1] - '0'
                                             : dst[i + 1] - 'A' + 10) << 4);
            c |= dst[i + 2] <= '9' ? dst[i + 2] - '0' : dst[i + 2] - 'A' + 10;
            i += 3;

        } else {
            c = dst[i++];
        }

        if (j >= size || c != src[j]) {
            fail("xtext does not decode back");
        }
    }

    if (j != size) {
        fail("xtext decodes to a different length");
    }

    free(dst);
    free(src);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t  max, lines, i;

    if (size < 1 || size > 16384) {
        return 0;
    }

    max = (data[0] & 1) ? 8 + data[0] : NGX_SMTP_MAX_LINE;

    data++;
    size--;

    check_lines(data, size, max);
    check_replies(data, size, max);

    /* copy_reply on anything: one line per LF, plus an unfinished one */
    lines = 1;

    for (i = 0; i < size; i++) {
        if (data[i] == '\n') {
            lines++;
        }
    }

    check_copy((u_char *) data, size, lines, NULL);

    check_xtext(data, size);

    return 0;
}
