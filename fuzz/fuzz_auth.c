
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * libFuzzer target of the AUTH payload, password scheme and route target
 * parsers (ngx_smtp_auth.c).
 *
 * Input: 1 control octet (its low 3 bits choose the parser), then the
 * payload, given in a heap buffer of exactly its size.
 *
 * Checked beyond memory safety: every result points inside the input and
 * the input is rebuilt from the parts (nothing is skipped or invented);
 * a classified base64 line decodes (with a reference decoder) to exactly
 * the announced length; a PLAIN user name has no NUL, CR or LF and the
 * password no NUL; a CRAM-MD5 digest is 32 hex digits; an ADDR or HOST
 * route prints back as host:port with a port of 1-65535; the parsers
 * give the same answer twice.
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ngx_smtp_core.h"


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


static void
fail(const char *what)
{
    fprintf(stderr, "fuzz_auth: %s\n", what);
    abort();
}


static void
inside(ngx_smtp_str_t *s, u_char *p, size_t len)
{
    if (s->len && (s->data < p || s->data + s->len > p + len)) {
        fail("a result points outside the input");
    }
}


static int
b64_value(u_char c)
{
    if (c >= 'A' && c <= 'Z') {
        return c - 'A';
    }

    if (c >= 'a' && c <= 'z') {
        return c - 'a' + 26;
    }

    if (c >= '0' && c <= '9') {
        return c - '0' + 52;
    }

    if (c == '+') {
        return 62;
    }

    if (c == '/') {
        return 63;
    }

    return -1;
}


/* a plain reference decoder: octets out, or -1 */

static long
b64_decode(u_char *p, size_t len)
{
    size_t    i, bits, out;
    unsigned  acc;
    int       v;

    acc = 0;
    bits = 0;
    out = 0;

    for (i = 0; i < len && p[i] != '='; i++) {
        v = b64_value(p[i]);
        if (v < 0) {
            return -1;
        }

        acc = (acc << 6) | (unsigned) v;
        bits += 6;

        if (bits >= 8) {
            bits -= 8;
            out++;
        }
    }

    for ( /* void */ ; i < len; i++) {
        if (p[i] != '=') {
            return -1;
        }
    }

    return (long) out;
}


static void
check_response(u_char *p, size_t len)
{
    int     rc;
    size_t  n;
    long    ref;

    rc = ngx_smtp_sasl_response(p, len, &n);

    switch (rc) {

    case NGX_SMTP_AUTH_EMPTY:
        if (!(len == 0 || (len == 1 && p[0] == '='))) {
            fail("EMPTY for a non-empty line");
        }
        break;

    case NGX_SMTP_AUTH_CANCEL:
        if (len != 1 || p[0] != '*') {
            fail("CANCEL for something else than \"*\"");
        }
        break;

    case NGX_SMTP_AUTH_DATA:
        ref = b64_decode(p, len);
        if (ref < 0 || (size_t) ref != n) {
            fail("DATA length differs from the reference decoder");
        }

        if (n == 0 || n > len) {
            fail("DATA of an odd length");
        }
        break;

    case NGX_SMTP_AUTH_BAD:
        if (n != 0) {
            fail("BAD with a length");
        }
        break;

    default:
        fail("unknown response class");
    }
}


static void
check_plain(u_char *p, size_t len)
{
    int             rc;
    size_t          i;
    ngx_smtp_str_t  z, u, pw;

    rc = ngx_smtp_sasl_plain(p, len, &z, &u, &pw);

    if (rc != NGX_SMTP_OK) {
        return;
    }

    inside(&z, p, len);
    inside(&u, p, len);
    inside(&pw, p, len);

    /* authzid NUL user NUL passwd, nothing more */

    if (z.len + 1 + u.len + 1 + pw.len != len
        || (z.len && z.data != p)
        || u.data != p + z.len + 1
        || p[z.len] != '\0' || p[z.len + 1 + u.len] != '\0'
        || (pw.len && pw.data != p + z.len + u.len + 2))
    {
        fail("PLAIN parts do not rebuild the input");
    }

    if (!ngx_smtp_sasl_user_valid(u.data, u.len)) {
        fail("PLAIN user name not valid");
    }

    for (i = 0; i < pw.len; i++) {
        if (pw.data[i] == '\0') {
            fail("NUL in a PLAIN password");
        }
    }
}


static void
check_login(u_char *p, size_t len)
{
    int             rc, step;
    ngx_smtp_str_t  out;

    for (step = 0; step < 2; step++) {
        rc = ngx_smtp_sasl_login(step, p, len, &out);

        if (rc != NGX_SMTP_OK) {
            if (step == NGX_SMTP_AUTH_LOGIN_USER
                && ngx_smtp_sasl_user_valid(p, len))
            {
                fail("LOGIN refused a valid user name");
            }

            continue;
        }

        if (out.data != p || out.len != len) {
            fail("LOGIN changed its input");
        }

        if (step == NGX_SMTP_AUTH_LOGIN_USER
            && !ngx_smtp_sasl_user_valid(p, len))
        {
            fail("LOGIN took an invalid user name");
        }

        if (len && memchr(p, '\0', len)) {
            fail("LOGIN took a NUL");
        }
    }
}


static void
check_cram(u_char *p, size_t len)
{
    int             rc;
    size_t          i;
    ngx_smtp_str_t  u, d;

    rc = ngx_smtp_sasl_cram(p, len, &u, &d);

    if (rc != NGX_SMTP_OK) {
        return;
    }

    inside(&u, p, len);
    inside(&d, p, len);

    if (u.data != p || u.len + 1 + d.len != len || p[u.len] != ' '
        || d.data != p + u.len + 1 || d.len != 32)
    {
        fail("CRAM-MD5 parts do not rebuild the input");
    }

    for (i = 0; i < 32; i++) {
        if (strchr("0123456789abcdefABCDEF", d.data[i]) == NULL
            || d.data[i] == '\0')
        {
            fail("CRAM-MD5 digest not hex");
        }
    }

    if (!ngx_smtp_sasl_user_valid(u.data, u.len)) {
        fail("CRAM-MD5 user name not valid");
    }
}


static void
check_scheme(u_char *p, size_t len)
{
    u_char                *close;
    ngx_smtp_str_t         rest, rest2;
    ngx_smtp_pw_scheme_e   sc;

    sc = ngx_smtp_passwd_scheme(p, len, &rest);

    if (ngx_smtp_passwd_scheme(p, len, &rest2) != sc
        || rest.len != rest2.len || rest.data != rest2.data)
    {
        fail("scheme: two answers");
    }

    if (sc == NGX_SMTP_PW_INVALID) {
        return;
    }

    inside(&rest, p, len);

    if (p[0] == '$') {
        if (sc != NGX_SMTP_PW_CRYPT || rest.data != p || rest.len != len) {
            fail("scheme: a bare $id$ is not all crypt");
        }

        return;
    }

    if (p[0] != '{') {
        fail("scheme: neither { nor $");
    }

    close = memchr(p, '}', len);

    if (close == NULL || rest.data != close + 1
        || rest.data + rest.len != p + len)
    {
        fail("scheme: rest is not what follows the first }");
    }

    if (sc == NGX_SMTP_PW_CRYPT && rest.len == 0) {
        fail("scheme: crypt without a hash");
    }
}


static void
check_route(u_char *p, size_t len)
{
    int               rc;
    size_t            n;
    char              buf[NGX_SMTP_ROUTE_MAX + 16];
    ngx_smtp_route_t  rt, rt2;

    rc = ngx_smtp_route_target(p, len, &rt);

    if (ngx_smtp_route_target(p, len, &rt2) != rc
        || memcmp(&rt, &rt2, sizeof(rt)) != 0)
    {
        fail("route: two answers");
    }

    switch (rc) {

    case NGX_SMTP_ROUTE_INVALID:
    case NGX_SMTP_ROUTE_REJECT:
    case NGX_SMTP_ROUTE_NAME:
        if (rt.host.len || rt.port) {
            fail("route: a host or port without an address");
        }

        if (rc == NGX_SMTP_ROUTE_NAME && memchr(p, ':', len)) {
            fail("route: a name with a colon");
        }

        if (rc != NGX_SMTP_ROUTE_INVALID
            && (len == 0 || len > NGX_SMTP_ROUTE_MAX))
        {
            fail("route: an empty or long target taken");
        }

        return;

    case NGX_SMTP_ROUTE_ADDR:
    case NGX_SMTP_ROUTE_HOST:
        break;

    default:
        fail("route: unknown type");
    }

    inside(&rt.host, p, len);

    if (rt.port == 0 || rt.port > 65535 || rt.host.len == 0) {
        fail("route: bad port or empty host");
    }

    if (rt.ipv6 && rc != NGX_SMTP_ROUTE_ADDR) {
        fail("route: IPv6 host not an address");
    }

    n = (size_t) snprintf(buf, sizeof(buf), rt.ipv6 ? "[%.*s]:%u"
                                                    : "%.*s:%u",
                          (int) rt.host.len, (char *) rt.host.data, rt.port);

    if (n != len || memcmp(buf, p, len) != 0) {
        fail("route: host:port does not print back as the input");
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char  *p;
    size_t   len;

    if (size == 0) {
        return 0;
    }

    len = size - 1;

    /* exactly the payload: ASan sees any read past it */

    p = malloc(len ? len : 1);
    if (p == NULL) {
        return 0;
    }

    memcpy(p, data + 1, len);

    switch (data[0] & 7) {

    case 0:
    case 6:
        check_response(p, len);
        break;

    case 1:
        check_plain(p, len);
        break;

    case 2:
        check_login(p, len);
        break;

    case 3:
        check_cram(p, len);
        break;

    case 4:
        check_scheme(p, len);
        break;

    default:
        check_route(p, len);
        break;
    }

    free(p);

    return 0;
}
