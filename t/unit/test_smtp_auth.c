
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * Unit tests of the AUTH payload, password scheme and route target
 * parsers (ngx_smtp_auth.c).  Prints every failure and a final
 * "N passed, M failed" line, exits non-zero on any failure.
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ngx_smtp_core.h"


static unsigned  passed;
static unsigned  failed;


#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (cond) {                                                           \
            passed++;                                                         \
        } else {                                                              \
            failed++;                                                         \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                       \
            printf(__VA_ARGS__);                                              \
            printf("\n");                                                     \
        }                                                                     \
    } while (0)


/* a heap copy of exactly len octets, so that ASan sees any overread */

static u_char *
dup(const char *s, size_t len)
{
    u_char  *p;

    p = malloc(len ? len : 1);
    if (p == NULL) {
        abort();
    }

    memcpy(p, s, len);

    return p;
}


static int
str_is(ngx_smtp_str_t *s, const char *v, size_t len)
{
    return s->len == len && (len == 0 || memcmp(s->data, v, len) == 0);
}


#define S(lit)  lit, sizeof(lit) - 1


/* ---- response lines ---------------------------------------------------- */


static int
response(const char *s, size_t len, size_t *n)
{
    int      rc;
    u_char  *p;

    p = dup(s, len);
    rc = ngx_smtp_sasl_response(p, len, n);
    free(p);

    return rc;
}


static void
test_response(void)
{
    size_t  n;

    static const struct {
        const char  *line;
        int          rc;
        size_t       decoded;
    } v[] = {
        { "", NGX_SMTP_AUTH_EMPTY, 0 },
        { "=", NGX_SMTP_AUTH_EMPTY, 0 },
        { "*", NGX_SMTP_AUTH_CANCEL, 0 },
        { "YWRtaW4=", NGX_SMTP_AUTH_DATA, 5 },       /* admin */
        { "YWRtaW4", NGX_SMTP_AUTH_DATA, 5 },        /* unpadded */
        { "YQ==", NGX_SMTP_AUTH_DATA, 1 },
        { "YQ", NGX_SMTP_AUTH_DATA, 1 },
        { "YWI=", NGX_SMTP_AUTH_DATA, 2 },
        { "YWJj", NGX_SMTP_AUTH_DATA, 3 },
        { "AGFsaWNlAHNlY3JldA==", NGX_SMTP_AUTH_DATA, 13 },
        { "+/+/", NGX_SMTP_AUTH_DATA, 3 },
        { "Y", NGX_SMTP_AUTH_BAD, 0 },                /* 1 char group */
        { "YWJjY", NGX_SMTP_AUTH_BAD, 0 },
        { "YQ=", NGX_SMTP_AUTH_BAD, 0 },              /* short padding */
        { "YWJj=", NGX_SMTP_AUTH_BAD, 0 },            /* needless pad */
        { "YQ===", NGX_SMTP_AUTH_BAD, 0 },
        { "==", NGX_SMTP_AUTH_BAD, 0 },
        { "====", NGX_SMTP_AUTH_BAD, 0 },
        { "YWJj====", NGX_SMTP_AUTH_BAD, 0 },
        { "YQ==YQ==", NGX_SMTP_AUTH_BAD, 0 },         /* pad inside */
        { "YW=i", NGX_SMTP_AUTH_BAD, 0 },
        { "!!!notbase64", NGX_SMTP_AUTH_BAD, 0 },
        { "YWJj ", NGX_SMTP_AUTH_BAD, 0 },
        { " YWJj", NGX_SMTP_AUTH_BAD, 0 },
        { "**", NGX_SMTP_AUTH_BAD, 0 },
        { "YW-j", NGX_SMTP_AUTH_BAD, 0 },             /* base64url */
    };

    size_t  i;
    int     rc;

    for (i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        n = 99;
        rc = response(v[i].line, strlen(v[i].line), &n);
        CHECK(rc == v[i].rc && n == v[i].decoded,
              "response \"%s\": rc %d n %zu, want %d %zu", v[i].line, rc, n,
              v[i].rc, v[i].decoded);
    }

    /* a NUL is not base64 */
    rc = response("YW\0j", 4, &n);
    CHECK(rc == NGX_SMTP_AUTH_BAD, "NUL in base64: rc %d", rc);

    /* a whole command line of base64: 508 characters, 381 octets */
    {
        char  buf[508];

        memset(buf, 'A', sizeof(buf));
        rc = response(buf, sizeof(buf), &n);
        CHECK(rc == NGX_SMTP_AUTH_DATA && n == 381, "long: rc %d n %zu", rc,
              n);
    }
}


/* ---- user names, PLAIN, LOGIN, CRAM-MD5 ---------------------------------- */


static void
test_user(void)
{
    char  buf[300];

    CHECK(ngx_smtp_sasl_user_valid((u_char *) "alice", 5), "alice");
    CHECK(ngx_smtp_sasl_user_valid((u_char *) "joe+tag=1@ex.test", 17),
          "joe+tag");
    CHECK(ngx_smtp_sasl_user_valid((u_char *) "a b", 3), "space");
    CHECK(!ngx_smtp_sasl_user_valid((u_char *) "", 0), "empty");
    CHECK(!ngx_smtp_sasl_user_valid((u_char *) "a\0b", 3), "NUL");
    CHECK(!ngx_smtp_sasl_user_valid((u_char *) "a\rb", 3), "CR");
    CHECK(!ngx_smtp_sasl_user_valid((u_char *) "a\n", 2), "LF");

    memset(buf, 'u', sizeof(buf));
    CHECK(ngx_smtp_sasl_user_valid((u_char *) buf, NGX_SMTP_AUTH_MAX_USER),
          "255");
    CHECK(!ngx_smtp_sasl_user_valid((u_char *) buf,
                                    NGX_SMTP_AUTH_MAX_USER + 1), "256");
}


static int
plain(const char *s, size_t len, ngx_smtp_str_t *z, ngx_smtp_str_t *u,
    ngx_smtp_str_t *pw, u_char **buf)
{
    *buf = dup(s, len);

    return ngx_smtp_sasl_plain(*buf, len, z, u, pw);
}


static void
test_plain(void)
{
    int             rc;
    u_char         *b;
    ngx_smtp_str_t  z, u, pw;

    rc = plain(S("\0alice\0secret"), &z, &u, &pw, &b);
    CHECK(rc == NGX_SMTP_OK && z.len == 0 && str_is(&u, S("alice"))
          && str_is(&pw, S("secret")), "plain: rc %d", rc);
    free(b);

    rc = plain(S("someone\0alice\0secret"), &z, &u, &pw, &b);
    CHECK(rc == NGX_SMTP_OK && str_is(&z, S("someone"))
          && str_is(&u, S("alice")) && str_is(&pw, S("secret")),
          "plain authzid: rc %d", rc);
    free(b);

    rc = plain(S("\0alice\0"), &z, &u, &pw, &b);
    CHECK(rc == NGX_SMTP_OK && str_is(&u, S("alice")) && pw.len == 0,
          "plain empty password (fails verification later): rc %d", rc);
    free(b);

    /* user names must not be empty; exactly two NULs */

    rc = plain(S("\0\0secret"), &z, &u, &pw, &b);
    CHECK(rc == NGX_SMTP_ERROR, "plain empty authcid: rc %d", rc);
    free(b);

    rc = plain(S("alice\0secret"), &z, &u, &pw, &b);
    CHECK(rc == NGX_SMTP_ERROR, "plain one NUL: rc %d", rc);
    free(b);

    rc = plain(S("alicesecret"), &z, &u, &pw, &b);
    CHECK(rc == NGX_SMTP_ERROR, "plain no NUL: rc %d", rc);
    free(b);

    rc = plain(S("\0alice\0secret\0junk"), &z, &u, &pw, &b);
    CHECK(rc == NGX_SMTP_ERROR, "plain NUL in password: rc %d", rc);
    free(b);

    rc = plain(S("\0ali\rce\0secret"), &z, &u, &pw, &b);
    CHECK(rc == NGX_SMTP_ERROR, "plain CR in user: rc %d", rc);
    free(b);

    rc = plain("", 0, &z, &u, &pw, &b);
    CHECK(rc == NGX_SMTP_ERROR, "plain empty: rc %d", rc);
    free(b);

    rc = plain(S("\0"), &z, &u, &pw, &b);
    CHECK(rc == NGX_SMTP_ERROR, "plain NUL only: rc %d", rc);
    free(b);

    rc = plain(S("\0\0"), &z, &u, &pw, &b);
    CHECK(rc == NGX_SMTP_ERROR, "plain two NULs only: rc %d", rc);
    free(b);
}


static void
test_login(void)
{
    int             rc;
    u_char         *b;
    ngx_smtp_str_t  out;

    b = dup(S("admin"));
    rc = ngx_smtp_sasl_login(NGX_SMTP_AUTH_LOGIN_USER, b, 5, &out);
    CHECK(rc == NGX_SMTP_OK && out.data == b && out.len == 5, "login user");
    free(b);

    rc = ngx_smtp_sasl_login(NGX_SMTP_AUTH_LOGIN_USER, (u_char *) "", 0,
                             &out);
    CHECK(rc == NGX_SMTP_ERROR, "login empty user: rc %d", rc);

    b = dup(S("ad\0min"));
    rc = ngx_smtp_sasl_login(NGX_SMTP_AUTH_LOGIN_USER, b, 6, &out);
    CHECK(rc == NGX_SMTP_ERROR, "login NUL in user: rc %d", rc);
    rc = ngx_smtp_sasl_login(NGX_SMTP_AUTH_LOGIN_PASS, b, 6, &out);
    CHECK(rc == NGX_SMTP_ERROR, "login NUL in password: rc %d", rc);
    free(b);

    rc = ngx_smtp_sasl_login(NGX_SMTP_AUTH_LOGIN_PASS, (u_char *) "", 0,
                             &out);
    CHECK(rc == NGX_SMTP_OK && out.len == 0, "login empty password: rc %d",
          rc);

    b = dup(S("se cret"));
    rc = ngx_smtp_sasl_login(NGX_SMTP_AUTH_LOGIN_PASS, b, 7, &out);
    CHECK(rc == NGX_SMTP_OK && out.len == 7, "login password");
    free(b);
}


static void
test_cram(void)
{
    int             rc;
    u_char         *b;
    size_t          len;
    const char     *s;
    ngx_smtp_str_t  u, d;

    static const char  *hex = "b913a602c7eda7a495b4e6e7334d3890";

    s = "tim b913a602c7eda7a495b4e6e7334d3890";
    len = strlen(s);
    b = dup(s, len);
    rc = ngx_smtp_sasl_cram(b, len, &u, &d);
    CHECK(rc == NGX_SMTP_OK && str_is(&u, S("tim"))
          && str_is(&d, hex, 32), "cram: rc %d", rc);
    free(b);

    s = "tim smith B913A602C7EDA7A495B4E6E7334D3890";
    len = strlen(s);
    b = dup(s, len);
    rc = ngx_smtp_sasl_cram(b, len, &u, &d);
    CHECK(rc == NGX_SMTP_OK && str_is(&u, S("tim smith")) && d.len == 32,
          "cram: user with a space, upper-case hex: rc %d", rc);
    free(b);

    static const char  *bad[] = {
        "",
        "tim",
        " b913a602c7eda7a495b4e6e7334d3890",          /* no user */
        "timb913a602c7eda7a495b4e6e7334d3890",        /* no space */
        "tim b913a602c7eda7a495b4e6e7334d389",        /* 31 digits */
        "tim b913a602c7eda7a495b4e6e7334d38900",      /* 33 digits */
        "tim g913a602c7eda7a495b4e6e7334d3890",       /* not hex */
        "tim b913a602c7eda7a495b4e6e7334d3890 ",      /* trailing space */
        "b913a602c7eda7a495b4e6e7334d3890",
    };

    size_t  i;

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        len = strlen(bad[i]);
        b = dup(bad[i], len);
        rc = ngx_smtp_sasl_cram(b, len, &u, &d);
        CHECK(rc == NGX_SMTP_ERROR, "cram \"%s\": rc %d", bad[i], rc);
        free(b);
    }

    b = dup(S("t\0m b913a602c7eda7a495b4e6e7334d3890"));
    rc = ngx_smtp_sasl_cram(b, 36, &u, &d);
    CHECK(rc == NGX_SMTP_ERROR, "cram NUL in user: rc %d", rc);
    free(b);
}


/* ---- password schemes ---------------------------------------------------- */


static void
test_passwd_scheme(void)
{
    size_t                 i, len;
    u_char                *b;
    ngx_smtp_str_t         rest;
    ngx_smtp_pw_scheme_e   sc;

    static const struct {
        const char            *stored;
        ngx_smtp_pw_scheme_e   scheme;
        const char            *rest;
    } v[] = {
        { "{PLAIN}secret", NGX_SMTP_PW_PLAIN, "secret" },
        { "{plain}secret", NGX_SMTP_PW_PLAIN, "secret" },
        { "{CLEARTEXT}x}y", NGX_SMTP_PW_PLAIN, "x}y" },
        { "{PLAIN}", NGX_SMTP_PW_PLAIN, "" },
        { "{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=", NGX_SMTP_PW_SHA,
          "qUqP5cyxm6YcTAhz05Hph5gvu9M=" },
        { "{SSHA}abcd", NGX_SMTP_PW_SSHA, "abcd" },
        { "{SHA256}abcd", NGX_SMTP_PW_SHA256, "abcd" },
        { "{ssha256}abcd", NGX_SMTP_PW_SSHA256, "abcd" },
        { "{SHA512}abcd", NGX_SMTP_PW_SHA512, "abcd" },
        { "{SSHA512}abcd", NGX_SMTP_PW_SSHA512, "abcd" },
        { "$6$salt$hash", NGX_SMTP_PW_CRYPT, "$6$salt$hash" },
        { "$y$j9T$salt$hash", NGX_SMTP_PW_CRYPT, "$y$j9T$salt$hash" },
        { "$2b$10$abc", NGX_SMTP_PW_CRYPT, "$2b$10$abc" },
        { "{CRYPT}$6$s$h", NGX_SMTP_PW_CRYPT, "$6$s$h" },
        { "{SHA512-CRYPT}$6$s$h", NGX_SMTP_PW_CRYPT, "$6$s$h" },
        { "{blf-crypt}$2b$x", NGX_SMTP_PW_CRYPT, "$2b$x" },
        { "{MD5}abc", NGX_SMTP_PW_UNKNOWN, "abc" },
        { "{ARGON2ID}x", NGX_SMTP_PW_UNKNOWN, "x" },
        { "{CRYPT}", NGX_SMTP_PW_INVALID, "" },
        { "", NGX_SMTP_PW_INVALID, "" },
        { "secret", NGX_SMTP_PW_INVALID, "" },
        { "{PLAIN", NGX_SMTP_PW_INVALID, "" },
        { "{}x", NGX_SMTP_PW_INVALID, "" },
        { "{PL AIN}x", NGX_SMTP_PW_INVALID, "" },
        { "$", NGX_SMTP_PW_INVALID, "" },
        { "$$x", NGX_SMTP_PW_INVALID, "" },
        { "$6", NGX_SMTP_PW_INVALID, "" },
        { "$6!$x", NGX_SMTP_PW_INVALID, "" },
        { " {PLAIN}x", NGX_SMTP_PW_INVALID, "" },
    };

    for (i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        len = strlen(v[i].stored);
        b = dup(v[i].stored, len);
        sc = ngx_smtp_passwd_scheme(b, len, &rest);
        CHECK(sc == v[i].scheme
              && (sc == NGX_SMTP_PW_INVALID
                  || str_is(&rest, v[i].rest, strlen(v[i].rest))),
              "scheme \"%s\": %d, want %d", v[i].stored, (int) sc,
              (int) v[i].scheme);
        free(b);
    }
}


/* ---- route targets ------------------------------------------------------- */


static void
test_route(void)
{
    int               rc;
    size_t            i, len;
    u_char           *b;
    ngx_smtp_route_t  rt;

    static const struct {
        const char  *target;
        int          type;
        const char  *host;
        unsigned     port;
    } v[] = {
        { "reject", NGX_SMTP_ROUTE_REJECT, NULL, 0 },
        { "REJECT", NGX_SMTP_ROUTE_REJECT, NULL, 0 },
        { "pool1", NGX_SMTP_ROUTE_NAME, NULL, 0 },
        { "rejected", NGX_SMTP_ROUTE_NAME, NULL, 0 },
        { "10.0.0.1", NGX_SMTP_ROUTE_NAME, NULL, 0 },
        { "127.0.0.1:2525", NGX_SMTP_ROUTE_ADDR, "127.0.0.1", 2525 },
        { "0.0.0.0:1", NGX_SMTP_ROUTE_ADDR, "0.0.0.0", 1 },
        { "255.255.255.254:65535", NGX_SMTP_ROUTE_ADDR, "255.255.255.254",
          65535 },
        { "[::1]:25", NGX_SMTP_ROUTE_ADDR, "::1", 25 },
        { "[2001:db8::1]:587", NGX_SMTP_ROUTE_ADDR, "2001:db8::1", 587 },
        { "[::ffff:1.2.3.4]:25", NGX_SMTP_ROUTE_ADDR, "::ffff:1.2.3.4", 25 },
        { "localhost:25", NGX_SMTP_ROUTE_HOST, "localhost", 25 },
        { "mx-1.example.test:25", NGX_SMTP_ROUTE_HOST, "mx-1.example.test",
          25 },
        { "1.2.3:25", NGX_SMTP_ROUTE_HOST, "1.2.3", 25 },
        { "", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "pool 1", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "pool\t1", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "127.0.0.1:0", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "127.0.0.1:65536", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "127.0.0.1:025252", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "127.0.0.1:025", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "localhost:00", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "127.0.0.1:", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "127.0.0.1:+25", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "127.0.0.1:25:25", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { ":25", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "::1:25", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "[::1]", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "[::1]25", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "[::1:25", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "[1.2.3.4]:25", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "[::g]:25", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "[]:25", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "1.2.3.256:25", NGX_SMTP_ROUTE_HOST, "1.2.3.256", 25 },
        { "1.2.3.4.5:25", NGX_SMTP_ROUTE_HOST, "1.2.3.4.5", 25 },
        { "1.2.3.0004:25", NGX_SMTP_ROUTE_HOST, "1.2.3.0004", 25 },
        { "mx_!:25", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
        { "h\xc3\xa9:25", NGX_SMTP_ROUTE_INVALID, NULL, 0 },
    };

    for (i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        len = strlen(v[i].target);
        b = dup(v[i].target, len);
        rc = ngx_smtp_route_target(b, len, &rt);

        CHECK(rc == v[i].type
              && (v[i].host == NULL
                  || (str_is(&rt.host, v[i].host, strlen(v[i].host))
                      && rt.port == v[i].port)),
              "route \"%s\": %d port %u, want %d", v[i].target, rc, rt.port,
              v[i].type);

        if (rc == NGX_SMTP_ROUTE_INVALID || rc == NGX_SMTP_ROUTE_NAME
            || rc == NGX_SMTP_ROUTE_REJECT)
        {
            CHECK(rt.host.len == 0 && rt.port == 0,
                  "route \"%s\": no host or port", v[i].target);
        }

        free(b);
    }

    {
        char  buf[NGX_SMTP_ROUTE_MAX + 1];

        memset(buf, 'p', sizeof(buf));
        rc = ngx_smtp_route_target((u_char *) buf, NGX_SMTP_ROUTE_MAX, &rt);
        CHECK(rc == NGX_SMTP_ROUTE_NAME, "route of the longest name");
        rc = ngx_smtp_route_target((u_char *) buf, sizeof(buf), &rt);
        CHECK(rc == NGX_SMTP_ROUTE_INVALID, "route too long");
    }

    b = dup(S("pool\0x"));
    rc = ngx_smtp_route_target(b, 6, &rt);
    CHECK(rc == NGX_SMTP_ROUTE_INVALID, "route with a NUL: %d", rc);
    free(b);
}


int
main(void)
{
    test_response();
    test_user();
    test_plain();
    test_login();
    test_cram();
    test_passwd_scheme();
    test_route();

    printf("%u passed, %u failed\n", passed, failed);

    return failed ? 1 : 0;
}
