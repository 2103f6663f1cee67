
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * AUTH payloads, stored password schemes and route targets: recognizing
 * and splitting only, without I/O or allocation (see ngx_smtp_core.h).
 */


#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE
#endif

#include <string.h>

#include "ngx_smtp_core.h"


#define ngx_smtp_lc(c)     (u_char) (((c) >= 'A' && (c) <= 'Z') ? ((c) | 0x20) \
                                                                 : (c))
#define ngx_smtp_digit(c)  ((c) >= '0' && (c) <= '9')
#define ngx_smtp_hex(c)    (ngx_smtp_digit(c)                                 \
                            || (ngx_smtp_lc(c) >= 'a' && ngx_smtp_lc(c) <= 'f'))


typedef struct {
    const char             *name;
    ngx_smtp_pw_scheme_e    scheme;
} ngx_smtp_pw_name_t;


static int ngx_smtp_sasl_b64(u_char c);
static int ngx_smtp_sasl_caseless(u_char *p, size_t len, const char *s);
static int ngx_smtp_route_ipv4(u_char *p, size_t len);
static int ngx_smtp_route_ipv6(u_char *p, size_t len);
static int ngx_smtp_route_hostname(u_char *p, size_t len);


static ngx_smtp_pw_name_t  ngx_smtp_pw_names[] = {
    { "PLAIN", NGX_SMTP_PW_PLAIN },
    { "CLEARTEXT", NGX_SMTP_PW_PLAIN },
    { "SHA", NGX_SMTP_PW_SHA },
    { "SSHA", NGX_SMTP_PW_SSHA },
    { "SHA256", NGX_SMTP_PW_SHA256 },
    { "SSHA256", NGX_SMTP_PW_SSHA256 },
    { "SHA512", NGX_SMTP_PW_SHA512 },
    { "SSHA512", NGX_SMTP_PW_SSHA512 },
    { NULL, NGX_SMTP_PW_INVALID }
};


static int
ngx_smtp_sasl_b64(u_char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')
           || ngx_smtp_digit(c) || c == '+' || c == '/';
}


static int
ngx_smtp_sasl_caseless(u_char *p, size_t len, const char *s)
{
    size_t  i;

    if (len != strlen(s)) {
        return 0;
    }

    for (i = 0; i < len; i++) {
        if (ngx_smtp_lc(p[i]) != ngx_smtp_lc((u_char) s[i])) {
            return 0;
        }
    }

    return 1;
}


int
ngx_smtp_sasl_response(u_char *p, size_t len, size_t *decoded)
{
    size_t  n, pad;

    *decoded = 0;

    if (len == 0 || (len == 1 && p[0] == '=')) {
        return NGX_SMTP_AUTH_EMPTY;
    }

    if (len == 1 && p[0] == '*') {
        return NGX_SMTP_AUTH_CANCEL;
    }

    for (n = 0; n < len && ngx_smtp_sasl_b64(p[n]); n++) {
        /* void */
    }

    for (pad = 0; n + pad < len && p[n + pad] == '='; pad++) {
        /* void */
    }

    if (n + pad != len || n % 4 == 1) {
        return NGX_SMTP_AUTH_BAD;
    }

    /* padding, when present, completes the last group exactly */

    if (pad > 2 || (pad && (n + pad) % 4 != 0)) {
        return NGX_SMTP_AUTH_BAD;
    }

    *decoded = n / 4 * 3 + (n % 4 ? n % 4 - 1 : 0);

    return NGX_SMTP_AUTH_DATA;
}


int
ngx_smtp_sasl_user_valid(u_char *p, size_t len)
{
    size_t  i;

    if (len == 0 || len > NGX_SMTP_AUTH_MAX_USER) {
        return 0;
    }

    for (i = 0; i < len; i++) {
        if (p[i] == '\0' || p[i] == '\r' || p[i] == '\n') {
            return 0;
        }
    }

    return 1;
}


int
ngx_smtp_sasl_plain(u_char *p, size_t len, ngx_smtp_str_t *authzid,
    ngx_smtp_str_t *user, ngx_smtp_str_t *passwd)
{
    u_char  *last, *nul1, *nul2;

    last = p + len;

    nul1 = len ? memchr(p, '\0', len) : NULL;
    if (nul1 == NULL) {
        return NGX_SMTP_ERROR;
    }

    nul2 = memchr(nul1 + 1, '\0', last - nul1 - 1);
    if (nul2 == NULL
        || memchr(nul2 + 1, '\0', last - nul2 - 1) != NULL)
    {
        return NGX_SMTP_ERROR;
    }

    if (!ngx_smtp_sasl_user_valid(nul1 + 1, nul2 - nul1 - 1)) {
        return NGX_SMTP_ERROR;
    }

    authzid->data = p;
    authzid->len = nul1 - p;
    user->data = nul1 + 1;
    user->len = nul2 - nul1 - 1;
    passwd->data = nul2 + 1;
    passwd->len = last - nul2 - 1;

    return NGX_SMTP_OK;
}


int
ngx_smtp_sasl_login(int step, u_char *p, size_t len, ngx_smtp_str_t *out)
{
    if (step == NGX_SMTP_AUTH_LOGIN_USER) {
        if (!ngx_smtp_sasl_user_valid(p, len)) {
            return NGX_SMTP_ERROR;
        }

    } else if (len && memchr(p, '\0', len) != NULL) {
        return NGX_SMTP_ERROR;
    }

    out->data = p;
    out->len = len;

    return NGX_SMTP_OK;
}


int
ngx_smtp_sasl_cram(u_char *p, size_t len, ngx_smtp_str_t *user,
    ngx_smtp_str_t *digest)
{
    size_t  i;
    u_char  *d;

    if (len < 34) {
        return NGX_SMTP_ERROR;
    }

    d = p + len - 32;

    if (d[-1] != ' ') {
        return NGX_SMTP_ERROR;
    }

    for (i = 0; i < 32; i++) {
        if (!ngx_smtp_hex(d[i])) {
            return NGX_SMTP_ERROR;
        }
    }

    if (!ngx_smtp_sasl_user_valid(p, len - 33)) {
        return NGX_SMTP_ERROR;
    }

    user->data = p;
    user->len = len - 33;
    digest->data = d;
    digest->len = 32;

    return NGX_SMTP_OK;
}


ngx_smtp_pw_scheme_e
ngx_smtp_passwd_scheme(u_char *p, size_t len, ngx_smtp_str_t *rest)
{
    size_t               i, n;
    u_char              *close;
    ngx_smtp_pw_name_t  *pw;

    rest->data = p;
    rest->len = 0;

    if (len == 0) {
        return NGX_SMTP_PW_INVALID;
    }

    if (p[0] == '$') {
        /* "$id$...": an id of letters and digits, then another '$' */

        for (i = 1; i < len && p[i] != '$'; i++) {
            if (!(ngx_smtp_digit(p[i])
                  || (ngx_smtp_lc(p[i]) >= 'a' && ngx_smtp_lc(p[i]) <= 'z')))
            {
                return NGX_SMTP_PW_INVALID;
            }
        }

        if (i == 1 || i == len) {
            return NGX_SMTP_PW_INVALID;
        }

        rest->len = len;

        return NGX_SMTP_PW_CRYPT;
    }

    if (p[0] != '{') {
        return NGX_SMTP_PW_INVALID;
    }

    close = memchr(p + 1, '}', len - 1);
    if (close == NULL) {
        return NGX_SMTP_PW_INVALID;
    }

    n = close - p - 1;

    if (n == 0) {
        return NGX_SMTP_PW_INVALID;
    }

    for (i = 1; i <= n; i++) {
        if (!(ngx_smtp_digit(p[i]) || p[i] == '-' || p[i] == '_'
              || (ngx_smtp_lc(p[i]) >= 'a' && ngx_smtp_lc(p[i]) <= 'z')))
        {
            return NGX_SMTP_PW_INVALID;
        }
    }

    rest->data = close + 1;
    rest->len = p + len - rest->data;

    /* "{CRYPT}" and Dovecot's "{SHA512-CRYPT}" and alike */

    if (n >= 5 && ngx_smtp_sasl_caseless(p + 1 + n - 5, 5, "CRYPT")) {
        return rest->len ? NGX_SMTP_PW_CRYPT : NGX_SMTP_PW_INVALID;
    }

    for (pw = ngx_smtp_pw_names; pw->name; pw++) {
        if (ngx_smtp_sasl_caseless(p + 1, n, pw->name)) {
            return pw->scheme;
        }
    }

    return NGX_SMTP_PW_UNKNOWN;
}


int
ngx_smtp_route_target(u_char *p, size_t len, ngx_smtp_route_t *rt)
{
    size_t     i;
    u_char    *colon, *host, *port, *last;
    unsigned   n;

    memset(rt, 0, sizeof(ngx_smtp_route_t));

    if (len == 0 || len > NGX_SMTP_ROUTE_MAX) {
        return NGX_SMTP_ROUTE_INVALID;
    }

    for (i = 0; i < len; i++) {
        if (p[i] <= 0x20 || p[i] >= 0x7f) {
            return NGX_SMTP_ROUTE_INVALID;
        }
    }

    if (ngx_smtp_sasl_caseless(p, len, "reject")) {
        return NGX_SMTP_ROUTE_REJECT;
    }

    last = p + len;

    if (p[0] == '[') {
        host = p + 1;

        colon = memchr(host, ']', len - 1);
        if (colon == NULL || colon + 1 == last || colon[1] != ':') {
            return NGX_SMTP_ROUTE_INVALID;
        }

        rt->host.data = host;
        rt->host.len = colon - host;
        rt->ipv6 = 1;

        colon++;

        if (!ngx_smtp_route_ipv6(rt->host.data, rt->host.len)) {
            goto invalid;
        }

    } else {
        colon = memchr(p, ':', len);

        if (colon == NULL) {
            return NGX_SMTP_ROUTE_NAME;
        }

        rt->host.data = p;
        rt->host.len = colon - p;
    }

    /* the port: 1-65535, decimal, no sign, no leading zero */

    port = colon + 1;

    if (port == last || last - port > 5 || port[0] == '0') {
        goto invalid;
    }

    n = 0;

    for (i = 0; i < (size_t) (last - port); i++) {
        if (!ngx_smtp_digit(port[i])) {
            goto invalid;
        }

        n = n * 10 + (port[i] - '0');
    }

    if (n == 0 || n > 65535) {
        goto invalid;
    }

    rt->port = n;

    if (rt->ipv6 || ngx_smtp_route_ipv4(rt->host.data, rt->host.len)) {
        return NGX_SMTP_ROUTE_ADDR;
    }

    if (ngx_smtp_route_hostname(rt->host.data, rt->host.len)) {
        return NGX_SMTP_ROUTE_HOST;
    }

invalid:

    memset(rt, 0, sizeof(ngx_smtp_route_t));

    return NGX_SMTP_ROUTE_INVALID;
}


/* dotted quad, each part 0-255 in at most 3 digits */

static int
ngx_smtp_route_ipv4(u_char *p, size_t len)
{
    size_t    i, digits;
    unsigned  parts, v;

    parts = 0;
    digits = 0;
    v = 0;

    for (i = 0; i <= len; i++) {
        if (i == len || p[i] == '.') {
            if (digits == 0 || v > 255) {
                return 0;
            }

            parts++;
            digits = 0;
            v = 0;
            continue;
        }

        if (!ngx_smtp_digit(p[i]) || ++digits > 3) {
            return 0;
        }

        v = v * 10 + (p[i] - '0');
    }

    return parts == 4;
}


static int
ngx_smtp_route_ipv6(u_char *p, size_t len)
{
    size_t  i, colons;

    if (len < 2 || len > 45) {
        return 0;
    }

    colons = 0;

    for (i = 0; i < len; i++) {
        if (p[i] == ':') {
            colons++;

        } else if (!ngx_smtp_hex(p[i]) && p[i] != '.') {
            return 0;
        }
    }

    return colons >= 2;
}


/* letters, digits, '-', '.', '_': a name nginx resolved at start-up */

static int
ngx_smtp_route_hostname(u_char *p, size_t len)
{
    size_t  i;
    u_char  c;

    if (len == 0) {
        return 0;
    }

    for (i = 0; i < len; i++) {
        c = ngx_smtp_lc(p[i]);

        if (!((c >= 'a' && c <= 'z') || ngx_smtp_digit(c) || c == '-'
              || c == '.' || c == '_'))
        {
            return 0;
        }
    }

    return 1;
}
