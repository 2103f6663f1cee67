
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * Unit tests of the sans-I/O SMTP core (ngx_smtp_core.h).  Self-contained:
 * prints every failure and a final "N passed, M failed" line, and exits
 * non-zero on any failure.  Meant to run under ASan and UBSan.
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


/* a printable form of a short buffer, for failure messages */

static const char *
show(const u_char *p, size_t len)
{
    static char  buf[4][2048];
    static int   n;
    char        *b, *d;
    size_t       i;

    b = buf[n++ & 3];
    d = b;

    for (i = 0; i < len && d < b + sizeof(buf[0]) - 8; i++) {
        if (p[i] == '\r') {
            d += sprintf(d, "\\r");

        } else if (p[i] == '\n') {
            d += sprintf(d, "\\n");

        } else if (p[i] < 0x20 || p[i] >= 0x7f) {
            d += sprintf(d, "\\x%02x", p[i]);

        } else {
            *d++ = p[i];
        }
    }

    *d = '\0';

    return b;
}


static int
str_eq(ngx_smtp_str_t *s, const char *v)
{
    return s->len == strlen(v) && memcmp(s->data, v, s->len) == 0;
}


/* ---- line splitter ---------------------------------------------------- */

static void
test_find_line(void)
{
    int              rc;
    u_char           buf[600];
    ngx_smtp_line_t  line;

    memcpy(buf, "HELO x\r\nNOOP\r\n", 14);
    rc = ngx_smtp_find_line(buf, buf + 14, 512, &line);
    CHECK(rc == NGX_SMTP_OK && line.start == buf && line.len == 6
          && line.consumed == 8, "crlf line: rc %d len %zu consumed %zu",
          rc, line.len, line.consumed);

    rc = ngx_smtp_find_line(buf + 8, buf + 14, 512, &line);
    CHECK(rc == NGX_SMTP_OK && line.len == 4 && line.consumed == 6,
          "second line");

    memcpy(buf, "HELO x\n", 7);
    rc = ngx_smtp_find_line(buf, buf + 7, 512, &line);
    CHECK(rc == NGX_SMTP_OK && line.len == 6 && line.consumed == 7,
          "bare lf line");

    rc = ngx_smtp_find_line(buf, buf + 6, 512, &line);
    CHECK(rc == NGX_SMTP_AGAIN, "partial line: rc %d", rc);

    rc = ngx_smtp_find_line(buf, buf, 512, &line);
    CHECK(rc == NGX_SMTP_AGAIN, "empty input");

    memcpy(buf, "\r\n", 2);
    rc = ngx_smtp_find_line(buf, buf + 2, 512, &line);
    CHECK(rc == NGX_SMTP_OK && line.len == 0 && line.consumed == 2,
          "empty line");

    /* 510 octets + CRLF = 512: fine */
    memset(buf, 'a', sizeof(buf));
    memcpy(buf + 510, "\r\n", 2);
    rc = ngx_smtp_find_line(buf, buf + 512, 512, &line);
    CHECK(rc == NGX_SMTP_OK && line.len == 510 && line.consumed == 512,
          "510+crlf: rc %d len %zu", rc, line.len);

    /* 511 octets + CRLF = 513: too long, LF seen */
    memset(buf, 'a', sizeof(buf));
    memcpy(buf + 511, "\r\n", 2);
    rc = ngx_smtp_find_line(buf, buf + 520, 512, &line);
    CHECK(rc == NGX_SMTP_LINE_TOO_LONG && line.len == 1
          && line.consumed == 513, "511+crlf: rc %d len %zu consumed %zu",
          rc, line.len, line.consumed);

    /* bare LF counts as if it were CRLF */
    memset(buf, 'a', sizeof(buf));
    buf[510] = '\n';
    rc = ngx_smtp_find_line(buf, buf + 511, 512, &line);
    CHECK(rc == NGX_SMTP_OK && line.len == 510, "510+lf");

    memset(buf, 'a', sizeof(buf));
    buf[511] = '\n';
    rc = ngx_smtp_find_line(buf, buf + 512, 512, &line);
    CHECK(rc == NGX_SMTP_LINE_TOO_LONG && line.len == 1
          && line.consumed == 512, "511+lf: rc %d", rc);

    /* no LF: AGAIN below max octets, too long at max */
    memset(buf, 'a', sizeof(buf));
    rc = ngx_smtp_find_line(buf, buf + 511, 512, &line);
    CHECK(rc == NGX_SMTP_AGAIN, "511 no lf: rc %d", rc);

    buf[510] = '\r';
    rc = ngx_smtp_find_line(buf, buf + 511, 512, &line);
    CHECK(rc == NGX_SMTP_AGAIN, "510+cr no lf: rc %d", rc);

    memset(buf, 'a', sizeof(buf));
    rc = ngx_smtp_find_line(buf, buf + 512, 512, &line);
    CHECK(rc == NGX_SMTP_LINE_TOO_LONG && line.len == 0
          && line.consumed == 512, "512 no lf: rc %d len %zu consumed %zu",
          rc, line.len, line.consumed);

    rc = ngx_smtp_find_line(buf, buf + 600, 512, &line);
    CHECK(rc == NGX_SMTP_LINE_TOO_LONG && line.len == 0
          && line.consumed == 600, "600 no lf");
}


/* ---- commands --------------------------------------------------------- */

#define ANY  -2     /* field not checked */

typedef struct {
    const char  *line;
    int          rc;
    int          cmd;
    const char  *arg;       /* NULL: not checked */
    const char  *path;
    const char  *params;
    long long    size;
    int          body;
    int          smtputf8;
    int          utf8;
    int          null;
} cmd_test_t;


#define C_OK(l, c, a)  { l, NGX_SMTP_OK, c, a, NULL, NULL, ANY, ANY, ANY,     \
                         ANY, ANY }
#define C_RC(l, r)     { l, r, ANY, NULL, NULL, NULL, ANY, ANY, ANY, ANY,     \
                         ANY }
#define C_PATH(l, r, c, p, pa, s, b, u8, up, n)                               \
                       { l, r, c, NULL, p, pa, s, b, u8, up, n }

#define UNK   NGX_SMTP_E_UNKNOWN
#define SYN   NGX_SMTP_E_SYNTAX
#define PAR   NGX_SMTP_E_PARAM
#define OK    NGX_SMTP_OK
#define UTF   NGX_SMTP_E_UTF8
#define MAIL  NGX_SMTP_CMD_MAIL
#define RCPT  NGX_SMTP_CMD_RCPT
#define B7    NGX_SMTP_BODY_7BIT
#define B8    NGX_SMTP_BODY_8BITMIME

static cmd_test_t  cmd_tests[] = {

    C_OK("HELO example.com", NGX_SMTP_CMD_HELO, "example.com"),
    C_OK("helo   example.com   ", NGX_SMTP_CMD_HELO, "example.com"),
    C_OK("EHLO [127.0.0.1]", NGX_SMTP_CMD_EHLO, "[127.0.0.1]"),
    C_OK("eHlO foo bar", NGX_SMTP_CMD_EHLO, "foo bar"),
    C_OK("EHLO \xc3\xa9xample", NGX_SMTP_CMD_EHLO, "\xc3\xa9xample"),
    C_RC("EHLO", SYN),
    C_RC("EHLO ", SYN),
    C_RC("HELO    ", SYN),
    C_RC("HELO a\x01" "b", SYN),
    C_RC("HELO a\tb", SYN),
    C_RC("HELO a\rb", SYN),
    C_RC("NOOP \x7f", SYN),

    C_RC("", UNK),
    C_RC(" HELO a", UNK),
    C_RC("XYZZY", UNK),
    C_RC("HELOX a", UNK),
    C_RC("HEL", UNK),
    C_RC("HELO\ta", UNK),
    C_RC("MAILFROM:<a@b>", UNK),
    C_RC("STARTTLSX", UNK),

    C_OK("DATA", NGX_SMTP_CMD_DATA, ""),
    C_OK("data  ", NGX_SMTP_CMD_DATA, ""),
    C_RC("DATA x", SYN),
    C_OK("RSET", NGX_SMTP_CMD_RSET, ""),
    C_RC("RSET now", SYN),
    C_OK("QUIT", NGX_SMTP_CMD_QUIT, ""),
    C_RC("QUIT now", SYN),
    C_OK("StartTLS", NGX_SMTP_CMD_STARTTLS, ""),
    C_RC("STARTTLS x", SYN),
    C_OK("NOOP", NGX_SMTP_CMD_NOOP, ""),
    C_OK("NOOP hello there", NGX_SMTP_CMD_NOOP, "hello there"),
    C_OK("HELP", NGX_SMTP_CMD_HELP, ""),
    C_OK("HELP MAIL", NGX_SMTP_CMD_HELP, "MAIL"),
    C_OK("VRFY user", NGX_SMTP_CMD_VRFY, "user"),
    C_OK("VRFY", NGX_SMTP_CMD_VRFY, ""),
    C_OK("EXPN list", NGX_SMTP_CMD_EXPN, "list"),
    C_OK("BDAT 100 LAST", NGX_SMTP_CMD_BDAT, "100 LAST"),
    C_OK("BDAT 0 last", NGX_SMTP_CMD_BDAT, "0 last"),
    C_OK("BDAT 4096", NGX_SMTP_CMD_BDAT, "4096"),
    C_RC("BDAT", SYN),
    C_RC("BDAT x", SYN),
    C_RC("BDAT -1", SYN),
    C_RC("BDAT 10 LASTX", SYN),
    C_RC("BDAT 10 LAST more", SYN),
    C_RC("BDAT 10x", SYN),
    C_RC("BDAT 1234567890123456789", OK),
    C_RC("BDAT 9223372036854775807", OK),
    C_RC("BDAT 9223372036854775808", SYN),
    C_RC("BDAT 99999999999999999999", SYN),

    C_OK("AUTH PLAIN", NGX_SMTP_CMD_AUTH, "PLAIN"),
    C_OK("auth login", NGX_SMTP_CMD_AUTH, "login"),
    C_OK("AUTH PLAIN dGVzdAB0ZXN0AHRlc3Q=", NGX_SMTP_CMD_AUTH,
         "PLAIN dGVzdAB0ZXN0AHRlc3Q="),
    C_OK("AUTH PLAIN =", NGX_SMTP_CMD_AUTH, "PLAIN ="),
    C_OK("AUTH CRAM-MD5", NGX_SMTP_CMD_AUTH, "CRAM-MD5"),
    C_RC("AUTH", SYN),
    C_RC("AUTH ", SYN),
    C_RC("AUTH PLAIN a b", SYN),
    C_RC("AUTH PL@IN", SYN),

    /* MAIL */
    C_PATH("MAIL FROM:<a@b>", 0, MAIL, "a@b", "", -1, 0, 0, 0, 0),
    C_PATH("mail from:<a@b.c>", 0, MAIL, "a@b.c", "", -1, 0, 0, 0, 0),
    C_PATH("MAIL FROM: <a@b>", 0, MAIL, "a@b", "", -1, 0, 0, 0, 0),
    C_PATH("MAIL FROM:   <a@b>   ", 0, MAIL, "a@b", "", -1, 0, 0, 0, 0),
    C_PATH("MAIL  FROM:<a@b>", 0, MAIL, "a@b", "", -1, 0, 0, 0, 0),
    C_PATH("MAIL FROM:<>", 0, MAIL, "", "", -1, 0, 0, 0, 1),
    C_PATH("MAIL FROM:<> SIZE=10", 0, MAIL, "", "SIZE=10", 10, 0, 0, 0, 1),
    C_PATH("MAIL FROM:<first.last+tag@sub.example-domain.com>", 0, MAIL,
           "first.last+tag@sub.example-domain.com", "", -1, 0, 0, 0, 0),
    C_PATH("MAIL FROM:<!#$%&'*+-/=?^_`{|}~@x>", 0, MAIL,
           "!#$%&'*+-/=?^_`{|}~@x", "", -1, 0, 0, 0, 0),
    C_PATH("MAIL FROM:<\"a b\"@c>", 0, MAIL, "\"a b\"@c", "", -1, 0, 0, 0,
           0),
    C_PATH("MAIL FROM:<\"a\\\"b>\"@c>", 0, MAIL, "\"a\\\"b>\"@c", "", -1, 0,
           0, 0, 0),
    C_PATH("MAIL FROM:<\"\"@c>", 0, MAIL, "\"\"@c", "", -1, 0, 0, 0, 0),
    C_PATH("MAIL FROM:<a@[1.2.3.4]>", 0, MAIL, "a@[1.2.3.4]", "", -1, 0, 0,
           0, 0),
    C_PATH("MAIL FROM:<a@[IPv6:::1]>", 0, MAIL, "a@[IPv6:::1]", "", -1, 0,
           0, 0, 0),
    C_PATH("MAIL FROM:<@r1.example,@r2.example:a@b>", 0, MAIL, "a@b", "",
           -1, 0, 0, 0, 0),
    C_RC("MAIL", SYN),
    C_RC("MAIL FROM:", SYN),
    C_RC("MAIL FROM:a@b", SYN),
    C_RC("MAIL FROM:<a@b", SYN),
    C_RC("MAIL FROM <a@b>", SYN),
    C_RC("MAIL FROM :<a@b>", SYN),
    C_RC("MAIL TO:<a@b>", SYN),
    C_RC("MAIL FROM:<postmaster>", SYN),
    C_RC("MAIL FROM:<user>", SYN),
    C_RC("MAIL FROM:<a..b@c>", SYN),
    C_RC("MAIL FROM:<.a@c>", SYN),
    C_RC("MAIL FROM:<a.@c>", SYN),
    C_RC("MAIL FROM:<a b@c>", SYN),
    C_RC("MAIL FROM:<a@b..c>", SYN),
    C_RC("MAIL FROM:<a@b.>", SYN),
    C_RC("MAIL FROM:<a@.b>", SYN),
    C_RC("MAIL FROM:<a@>", SYN),
    C_RC("MAIL FROM:<@b>", SYN),
    C_RC("MAIL FROM:<@>", SYN),
    C_RC("MAIL FROM:<a@b_c>", SYN),
    C_RC("MAIL FROM:<a@b@c>", SYN),
    C_RC("MAIL FROM:<a@[]>", SYN),
    C_RC("MAIL FROM:<a@[1.2.3.4>", SYN),
    C_RC("MAIL FROM:<a@[1.2 .3.4]>", SYN),
    C_RC("MAIL FROM:<a@[1[2]>", SYN),
    C_RC("MAIL FROM:<\"ab@c>", SYN),
    C_RC("MAIL FROM:<\"a\\", SYN),
    C_RC("MAIL FROM:<@:a@b>", SYN),
    C_RC("MAIL FROM:<@a,b:c@d>", SYN),
    C_RC("MAIL FROM:<@a:>", SYN),
    C_RC("MAIL FROM:<a@b>x", SYN),
    C_RC("MAIL FROM:<a@b>SIZE=1000", SYN),
    C_RC("MAIL FROM:<a@b>\tSIZE=1", SYN),
    C_RC("MAIL FROM:<a@b>\r", SYN),
    C_RC("MAIL FROM:<a@b>>", SYN),
    C_RC("MAIL FROM:<<a@b>", SYN),

    /* MAIL parameters */
    C_PATH("MAIL FROM:<a@b> SIZE=1000", 0, MAIL, "a@b", "SIZE=1000", 1000,
           0, 0, 0, 0),
    C_PATH("MAIL FROM:<a@b>   size=0   body=8bitmime  smtputf8  ", 0, MAIL,
           "a@b", "size=0   body=8bitmime  smtputf8", 0, B8, 1, 0, 0),
    C_PATH("MAIL FROM:<a@b> BODY=7BIT", 0, MAIL, "a@b", "BODY=7BIT", -1, B7,
           0, 0, 0),
    C_PATH("MAIL FROM:<a@b> SIZE=9223372036854775807", 0, MAIL, "a@b",
           NULL, 9223372036854775807LL, 0, 0, 0, 0),
    C_PATH("MAIL FROM:<a@b> SIZE=00000000000000000001", 0, MAIL, "a@b",
           NULL, 1, 0, 0, 0, 0),
    C_PATH("MAIL FROM:<a@b> AUTH=<>", 0, MAIL, "a@b", "AUTH=<>", -1, 0, 0,
           0, 0),
    C_RC("MAIL FROM:<a@b> SIZE=9223372036854775808", PAR),
    C_RC("MAIL FROM:<a@b> SIZE=99999999999999999999", PAR),
    C_RC("MAIL FROM:<a@b> SIZE=000000000000000000001", PAR),
    C_RC("MAIL FROM:<a@b> SIZE=", PAR),
    C_RC("MAIL FROM:<a@b> SIZE", PAR),
    C_RC("MAIL FROM:<a@b> SIZE=12a", PAR),
    C_RC("MAIL FROM:<a@b> SIZE=-1", PAR),
    C_RC("MAIL FROM:<a@b> SIZE=1 SIZE=2", PAR),
    C_RC("MAIL FROM:<a@b> SIZE=1 size=1", PAR),
    C_RC("MAIL FROM:<a@b> BODY=BINARYMIME", PAR),
    C_RC("MAIL FROM:<a@b> BODY=", PAR),
    C_RC("MAIL FROM:<a@b> BODY", PAR),
    C_RC("MAIL FROM:<a@b> BODY=7BIT BODY=7BIT", PAR),
    C_RC("MAIL FROM:<a@b> SMTPUTF8=yes", PAR),
    C_RC("MAIL FROM:<a@b> SMTPUTF8=", PAR),
    C_RC("MAIL FROM:<a@b> SMTPUTF8 SMTPUTF8", PAR),
    C_RC("MAIL FROM:<a@b> AUTH=", PAR),
    C_RC("MAIL FROM:<a@b> AUTH", PAR),
    C_RC("MAIL FROM:<a@b> AUTH=a AUTH=b", PAR),
    C_RC("MAIL FROM:<a@b> AUTH=\xc3\xa9", PAR),
    C_RC("MAIL FROM:<a@b> FOO=bar", PAR),
    C_RC("MAIL FROM:<a@b> =bar", PAR),
    C_RC("MAIL FROM:<a@b> RET=HDRS", OK),
    C_RC("MAIL FROM:<a@b> RET=full ENVID=QQ314159", OK),
    C_RC("MAIL FROM:<a@b> RET=SOME", SYN),
    C_RC("MAIL FROM:<a@b> RET=FULL RET=HDRS", PAR),
    C_RC("MAIL FROM:<a@b> ENVID=a+2Bb", OK),
    C_RC("MAIL FROM:<a@b> ENVID=a+2b", SYN),
    C_RC("MAIL FROM:<a@b> ENVID=a=b", SYN),
    C_RC("MAIL FROM:<a@b> ENVID=a+2", SYN),
    C_RC("MAIL FROM:<a@b> ENVID=", SYN),

    /* 8-bit addresses */
    C_RC("MAIL FROM:<j\xc3\xb6" "e@b>", UTF),
    C_RC("MAIL FROM:<a@\xc3\xa9xample.com> SIZE=1", UTF),
    C_PATH("MAIL FROM:<j\xc3\xb6" "e@b> SMTPUTF8", 0, MAIL,
           "j\xc3\xb6" "e@b", "SMTPUTF8", -1, 0, 1, 1, 0),
    C_RC("MAIL FROM:<j\xc3\xb6" "e@b> SMTPUTF8 FOO", PAR),

    /* RCPT */
    C_PATH("RCPT TO:<a@b>", 0, RCPT, "a@b", "", -1, 0, 0, 0, 0),
    C_PATH("rcpt to: <a@b>", 0, RCPT, "a@b", "", -1, 0, 0, 0, 0),
    C_PATH("RCPT TO:<postmaster>", 0, RCPT, "postmaster", "", -1, 0, 0, 0,
           0),
    C_PATH("RCPT TO:<PostMaster>", 0, RCPT, "PostMaster", "", -1, 0, 0, 0,
           0),
    C_PATH("RCPT TO:<postmaster@example.com>", 0, RCPT,
           "postmaster@example.com", "", -1, 0, 0, 0, 0),
    C_PATH("RCPT TO:<@relay.example,@r2.example:user@example.com>", 0, RCPT,
           "user@example.com", "", -1, 0, 0, 0, 0),
    C_PATH("RCPT TO:<j\xc3\xb6" "e@ex\xc3\xa4mple.com>", 0, RCPT,
           "j\xc3\xb6" "e@ex\xc3\xa4mple.com", "", -1, 0, 0, 1, 0),
    C_RC("RCPT TO:<>", SYN),
    C_RC("RCPT TO:<user>", SYN),
    C_RC("RCPT TO:<postmaster2>", SYN),
    C_RC("RCPT TO:<post.master>", SYN),
    C_RC("RCPT FROM:<a@b>", SYN),
    C_RC("RCPT TO:", SYN),
    C_RC("RCPT TO:a@b", SYN),
    C_RC("RCPT", SYN),
    C_RC("RCPT TO:<a@b> NOTIFY=NEVER", OK),
    C_RC("RCPT TO:<a@b> NOTIFY=SUCCESS,FAILURE,DELAY", OK),
    C_RC("RCPT TO:<a@b> notify=failure,delay ORCPT=rfc822;a@b", OK),
    C_RC("RCPT TO:<a@b> NOTIFY=NEVER,SUCCESS", SYN),
    C_RC("RCPT TO:<a@b> NOTIFY=NEVER,NEVER", SYN),
    C_RC("RCPT TO:<a@b> NOTIFY=SUCCESS,", SYN),
    C_RC("RCPT TO:<a@b> NOTIFY=,SUCCESS", SYN),
    C_RC("RCPT TO:<a@b> NOTIFY=SOMETIMES", SYN),
    C_RC("RCPT TO:<a@b> NOTIFY=", SYN),
    C_RC("RCPT TO:<a@b> NOTIFY=DELAY NOTIFY=DELAY", PAR),
    C_RC("RCPT TO:<a@b> ORCPT=rfc822;a+40b", OK),
    C_RC("RCPT TO:<a@b> ORCPT=rfc822", SYN),
    C_RC("RCPT TO:<a@b> ORCPT=;a@b", SYN),
    C_RC("RCPT TO:<a@b> ORCPT=rfc822;", SYN),
    C_RC("RCPT TO:<a@b> ORCPT=rfc822;a=b", SYN),
    C_RC("RCPT TO:<a@b> FOO=BAR", PAR),
    C_RC("RCPT TO:<a@b> AUTH=<>", PAR),
    C_RC("RCPT TO:<a@b> SMTPUTF8", PAR),

    { NULL, 0, 0, NULL, NULL, NULL, 0, 0, 0, 0, 0 }
};


static void
test_commands(void)
{
    int              rc;
    size_t           len;
    u_char           buf[600];
    cmd_test_t      *t;
    ngx_smtp_cmd_t   cmd;

    for (t = cmd_tests; t->line; t++) {
        len = strlen(t->line);

        /* exactly the line's octets, so ASan sees any overread */
        memcpy(buf, t->line, len);
        rc = ngx_smtp_parse_command(buf, len, &cmd);

        CHECK(rc == t->rc, "\"%s\": rc %d, expected %d",
              show(buf, len), rc, t->rc);

        if (rc != t->rc || rc != NGX_SMTP_OK) {
            if (rc == NGX_SMTP_E_UNKNOWN) {
                CHECK(cmd.cmd == NGX_SMTP_CMD_UNKNOWN, "unknown cmd");
            }

            continue;
        }

        if (t->cmd != ANY) {
            CHECK((int) cmd.cmd == t->cmd, "\"%s\": cmd %d, expected %d",
                  t->line, cmd.cmd, t->cmd);
        }

        if (t->arg) {
            CHECK(str_eq(&cmd.arg, t->arg), "\"%s\": arg \"%s\"", t->line,
                  show(cmd.arg.data, cmd.arg.len));
        }

        if (t->path) {
            CHECK(str_eq(&cmd.path, t->path), "\"%s\": path \"%s\"",
                  t->line, show(cmd.path.data, cmd.path.len));
        }

        if (t->params) {
            CHECK(str_eq(&cmd.params, t->params), "\"%s\": params \"%s\"",
                  t->line, show(cmd.params.data, cmd.params.len));
        }

        if (t->size != ANY) {
            CHECK((long long) cmd.size == t->size, "\"%s\": size %lld",
                  t->line, (long long) cmd.size);
        }

        if (t->body != ANY) {
            CHECK((int) cmd.body == t->body, "\"%s\": body %u", t->line,
                  cmd.body);
        }

        if (t->smtputf8 != ANY) {
            CHECK((int) cmd.smtputf8 == t->smtputf8, "\"%s\": smtputf8",
                  t->line);
        }

        if (t->utf8 != ANY) {
            CHECK((int) cmd.utf8_path == t->utf8, "\"%s\": utf8_path",
                  t->line);
        }

        if (t->null != ANY) {
            CHECK((int) cmd.null_path == t->null, "\"%s\": null_path",
                  t->line);
        }
    }
}


static void
test_command_details(void)
{
    int             rc;
    u_char          buf[64];
    ngx_smtp_cmd_t  cmd;

    /* NUL inside an argument: 501; inside a verb: 500 */
    memcpy(buf, "HELO a\0b", 8);
    rc = ngx_smtp_parse_command(buf, 8, &cmd);
    CHECK(rc == NGX_SMTP_E_SYNTAX, "NUL in HELO: rc %d", rc);

    memcpy(buf, "MAIL FROM:<a\0@b>", 16);
    rc = ngx_smtp_parse_command(buf, 16, &cmd);
    CHECK(rc == NGX_SMTP_E_SYNTAX, "NUL in path: rc %d", rc);

    memcpy(buf, "HE\0LO a", 7);
    rc = ngx_smtp_parse_command(buf, 7, &cmd);
    CHECK(rc == NGX_SMTP_E_UNKNOWN, "NUL in verb: rc %d", rc);

    memcpy(buf, "AUTH PLAIN dGVzdA==", 19);
    rc = ngx_smtp_parse_command(buf, 19, &cmd);
    CHECK(rc == NGX_SMTP_OK && str_eq(&cmd.mech, "PLAIN")
          && str_eq(&cmd.initial, "dGVzdA=="), "AUTH mech/initial");

    memcpy(buf, "AUTH LOGIN", 10);
    rc = ngx_smtp_parse_command(buf, 10, &cmd);
    CHECK(rc == NGX_SMTP_OK && str_eq(&cmd.mech, "LOGIN")
          && cmd.initial.len == 0, "AUTH without initial response");

    memcpy(buf, "MAIL FROM:<a@b> AUTH=a+2Bb SIZE=5", 33);
    rc = ngx_smtp_parse_command(buf, 33, &cmd);
    CHECK(rc == NGX_SMTP_OK && str_eq(&cmd.auth, "a+2Bb") && cmd.size == 5,
          "MAIL AUTH= value");

    /* the parser must not read past len */
    memcpy(buf, "MAIL FROM:<a@b>", 15);
    rc = ngx_smtp_parse_command(buf, 14, &cmd);
    CHECK(rc == NGX_SMTP_E_SYNTAX, "truncated MAIL: rc %d", rc);
}


/* ---- backend replies ---------------------------------------------------- */

static int
reply(const char *s, size_t max, ngx_smtp_reply_t *r)
{
    memset(r, 0, sizeof(ngx_smtp_reply_t));

    return ngx_smtp_parse_reply((u_char *) s, (u_char *) s + strlen(s), max,
                                r);
}


static void
test_replies(void)
{
    int               rc;
    size_t            i, len;
    u_char           *buf;
    ngx_smtp_reply_t  r;
    static char       multi[] = "250-mx.example.com\r\n250-PIPELINING\r\n"
                                "250 SIZE 1000\r\n";

    rc = reply("250 ok\r\n", 512, &r);
    CHECK(rc == NGX_SMTP_OK && r.code == 250 && r.len == 8 && r.lines == 1,
          "single line");

    rc = reply("250\r\n", 512, &r);
    CHECK(rc == NGX_SMTP_OK && r.code == 250 && r.len == 5,
          "bare code line is final");

    rc = reply(multi, 512, &r);
    CHECK(rc == NGX_SMTP_OK && r.code == 250 && r.len == strlen(multi)
          && r.lines == 3, "multiline: rc %d len %zu lines %u", rc, r.len,
          r.lines);

    rc = reply("250 ok\r\n250 next\r\n", 512, &r);
    CHECK(rc == NGX_SMTP_OK && r.len == 8, "two replies: the first");

    rc = reply("354 go ahead\r\n", 512, &r);
    CHECK(rc == NGX_SMTP_OK && r.code == 354, "354");

    rc = reply("250-a\r\n", 512, &r);
    CHECK(rc == NGX_SMTP_AGAIN, "unfinished multiline");

    rc = reply("", 512, &r);
    CHECK(rc == NGX_SMTP_AGAIN, "empty");

    rc = reply("250 o", 512, &r);
    CHECK(rc == NGX_SMTP_AGAIN, "partial line");

    rc = reply("250-a\r\n251 b\r\n", 512, &r);
    CHECK(rc == NGX_SMTP_ERROR, "codes differ");

    rc = reply("25 x\r\n", 512, &r);
    CHECK(rc == NGX_SMTP_ERROR, "two digits");

    rc = reply("abc\r\n", 512, &r);
    CHECK(rc == NGX_SMTP_ERROR, "letters");

    rc = reply("250x\r\n", 512, &r);
    CHECK(rc == NGX_SMTP_ERROR, "bad separator");

    rc = reply("650 x\r\n", 512, &r);
    CHECK(rc == NGX_SMTP_ERROR, "6xx");

    rc = reply("250 a\n", 512, &r);
    CHECK(rc == NGX_SMTP_ERROR, "bare LF");

    rc = reply("\r\n", 512, &r);
    CHECK(rc == NGX_SMTP_ERROR, "empty line");

    rc = reply("SSH-2.0-OpenSSH\r\n", 512, &r);
    CHECK(rc == NGX_SMTP_ERROR, "not SMTP");

    memset(&r, 0, sizeof(r));
    rc = ngx_smtp_parse_reply((u_char *) "250 a\0b\r\n",
                              (u_char *) "250 a\0b\r\n" + 9, 512, &r);
    CHECK(rc == NGX_SMTP_ERROR, "NUL");

    /* line length: max counts the CRLF */
    rc = reply("250 0123456789abcd\r\n", 20, &r);
    CHECK(rc == NGX_SMTP_OK, "line of exactly max octets");

    rc = reply("250 0123456789abcde\r\n", 20, &r);
    CHECK(rc == NGX_SMTP_ERROR, "line of max + 1 octets");

    rc = reply("250 0123456789abcd\r", 20, &r);
    CHECK(rc == NGX_SMTP_AGAIN, "max - 1 octets, no LF");

    rc = reply("250 0123456789abcde\r", 20, &r);
    CHECK(rc == NGX_SMTP_ERROR, "max octets, no LF: %d", rc);

    rc = reply("250-0123456789abcd\r\n250-0123456789abcdef", 20, &r);
    CHECK(rc == NGX_SMTP_ERROR, "second line too long");

    /* every split, fed incrementally with scanned state kept */
    len = strlen(multi);

    for (i = 0; i <= len; i++) {
        buf = malloc(len);
        memcpy(buf, multi, len);
        memset(&r, 0, sizeof(r));

        rc = ngx_smtp_parse_reply(buf, buf + i, 512, &r);

        if (i < len) {
            CHECK(rc == NGX_SMTP_AGAIN, "split %zu: rc %d", i, rc);
            rc = ngx_smtp_parse_reply(buf, buf + len, 512, &r);
        }

        CHECK(rc == NGX_SMTP_OK && r.len == len && r.lines == 3
              && r.code == 250, "split %zu: rc %d len %zu lines %u", i, rc,
              r.len, r.lines);

        free(buf);
    }

    /* byte at a time */
    buf = malloc(len);
    memcpy(buf, multi, len);
    memset(&r, 0, sizeof(r));

    for (i = 1; i <= len; i++) {
        rc = ngx_smtp_parse_reply(buf, buf + i, 512, &r);

        if (rc != NGX_SMTP_AGAIN) {
            break;
        }
    }

    CHECK(rc == NGX_SMTP_OK && i == len && r.len == len && r.lines == 3,
          "byte at a time: rc %d at %zu", rc, i);
    free(buf);
}


static void
test_ehlo(void)
{
    ngx_smtp_ehlo_t  e;
    static char      full[] =
        "250-mx.example.com Hello there\r\n"
        "250-PIPELINING\r\n"
        "250-SIZE 1000\r\n"
        "250-8BITMIME\r\n"
        "250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN\r\n"
        "250-ENHANCEDSTATUSCODES\r\n"
        "250-AUTH=LOGIN\r\n"
        "250-auth plain login\r\n"
        "250-smtputf8\r\n"
        "250-STARTTLS\r\n"
        "250-CHUNKING\r\n"
        "250-VRFY\r\n"
        "250 DSN\r\n";

    ngx_smtp_parse_ehlo((u_char *) full, strlen(full), &e);

    CHECK(e.caps == (NGX_SMTP_CAP_PIPELINING | NGX_SMTP_CAP_SIZE
                     | NGX_SMTP_CAP_8BITMIME | NGX_SMTP_CAP_SMTPUTF8
                     | NGX_SMTP_CAP_STARTTLS | NGX_SMTP_CAP_XCLIENT
                     | NGX_SMTP_CAP_ENHANCED | NGX_SMTP_CAP_CHUNKING
                     | NGX_SMTP_CAP_DSN | NGX_SMTP_CAP_AUTH),
          "all caps: %#x", e.caps);
    CHECK(e.size == 1000, "SIZE 1000: %lld", (long long) e.size);
    CHECK(e.xclient == (NGX_SMTP_XCLIENT_NAME | NGX_SMTP_XCLIENT_ADDR
                        | NGX_SMTP_XCLIENT_PORT | NGX_SMTP_XCLIENT_PROTO
                        | NGX_SMTP_XCLIENT_HELO | NGX_SMTP_XCLIENT_LOGIN),
          "xclient attrs: %#x", e.xclient);

    ngx_smtp_parse_ehlo((u_char *) "250-x\r\n250-XCLIENT name addr "
                        "REVERSE_NAME DESTADDR DESTPORT FOO\r\n250 SIZE\r\n",
                        strlen("250-x\r\n250-XCLIENT name addr "
                               "REVERSE_NAME DESTADDR DESTPORT FOO\r\n"
                               "250 SIZE\r\n"), &e);
    CHECK(e.caps == (NGX_SMTP_CAP_XCLIENT | NGX_SMTP_CAP_SIZE)
          && e.size == 0
          && e.xclient == (NGX_SMTP_XCLIENT_NAME | NGX_SMTP_XCLIENT_ADDR
                           | NGX_SMTP_XCLIENT_REVERSE_NAME
                           | NGX_SMTP_XCLIENT_DESTADDR
                           | NGX_SMTP_XCLIENT_DESTPORT),
          "xclient others, SIZE without a value: caps %#x xclient %#x",
          e.caps, e.xclient);

    /* the first line is the backend's name, not a keyword */
    ngx_smtp_parse_ehlo((u_char *) "250 PIPELINING\r\n", 16, &e);
    CHECK(e.caps == 0 && e.size == 0, "single line");

    ngx_smtp_parse_ehlo((u_char *) "250-x\r\n250 SIZE 99999999999999999999\r\n",
                        strlen("250-x\r\n250 SIZE 99999999999999999999\r\n"),
                        &e);
    CHECK(e.caps == NGX_SMTP_CAP_SIZE && e.size == 0, "huge SIZE: %lld",
          (long long) e.size);

    ngx_smtp_parse_ehlo((u_char *) "250-x\r\n250-PIPELININGX\r\n250 SIZES\r\n",
                        strlen("250-x\r\n250-PIPELININGX\r\n250 SIZES\r\n"),
                        &e);
    CHECK(e.caps == 0, "keyword prefixes are not keywords: %#x", e.caps);
}


static void
check_copy(const char *in, const char *expect, unsigned lines, int line)
{
    size_t   len, n;
    u_char  *dst;

    len = strlen(in);
    dst = malloc(len + 6 * lines);
    n = ngx_smtp_copy_reply(dst, (u_char *) in, len);

    if (n == strlen(expect) && memcmp(dst, expect, n) == 0) {
        passed++;

    } else {
        failed++;
        printf("FAIL %s:%d: copy_reply \"%s\" gave \"%s\"\n", __FILE__, line,
               show((u_char *) in, len), show(dst, n));
    }

    free(dst);
}


static void
test_copy_reply(void)
{
    check_copy("250 ok\r\n", "250 2.0.0 ok\r\n", 1, __LINE__);
    check_copy("250 2.1.0 Ok\r\n", "250 2.1.0 Ok\r\n", 1, __LINE__);
    check_copy("550-5.7.1 no\r\n550 relay\r\n",
               "550-5.7.1 no\r\n550 5.0.0 relay\r\n", 2, __LINE__);
    check_copy("450-a\r\n450-b\r\n450 c\r\n",
               "450-4.0.0 a\r\n450-4.0.0 b\r\n450 4.0.0 c\r\n", 3, __LINE__);
    check_copy("250\r\n", "250 2.0.0\r\n", 1, __LINE__);
    check_copy("250 \r\n", "250 2.0.0\r\n", 1, __LINE__);
    check_copy("250-\r\n250 x\r\n", "250-2.0.0\r\n250 2.0.0 x\r\n", 2,
               __LINE__);
    check_copy("250 2.0.0\r\n", "250 2.0.0\r\n", 1, __LINE__);
    check_copy("250 2.0 x\r\n", "250 2.0.0 2.0 x\r\n", 1, __LINE__);
    check_copy("250 2.1234.0 x\r\n", "250 2.0.0 2.1234.0 x\r\n", 1,
               __LINE__);
    check_copy("250 2.123.456 x\r\n", "250 2.123.456 x\r\n", 1, __LINE__);
    check_copy("250 2.0.0x\r\n", "250 2.0.0 2.0.0x\r\n", 1, __LINE__);
    check_copy("451 4.4.1\tbad\x01\r\n", "451 4.0.0 4.4.1?bad?\r\n", 1,
               __LINE__);
    check_copy("250 ok\rX\r\n", "250 2.0.0 ok?X\r\n", 1, __LINE__);
    check_copy("250 \x7f\xc3\xa9\r\n", "250 2.0.0 ?\xc3\xa9\r\n", 1,
               __LINE__);
    /* not a reply at all: only sanitised */
    check_copy("hello\x1b[0m\r\n", "hello?[0m\r\n", 1, __LINE__);
}


static void
check_shorten(const char *in, size_t size, const char *expect, int line)
{
    size_t  n;
    u_char  dst[256];

    n = ngx_smtp_shorten_reply(dst, size, (u_char *) in, strlen(in));

    if (n == strlen(expect) && memcmp(dst, expect, n) == 0 && n <= size) {
        passed++;

    } else {
        failed++;
        printf("FAIL %s:%d: shorten_reply(%zu) \"%s\" gave \"%s\"\n",
               __FILE__, line, size, show((u_char *) in, strlen(in)),
               show(dst, n));
    }
}


static void
test_shorten_reply(void)
{
    const char  *four = "550-5.1.1 aaaaaaaaaaaaaaaaaaaa\r\n"
                        "550-5.1.1 bbbbbbbbbbbbbbbbbbbb\r\n"
                        "550-5.1.1 cccccccccccccccccccc\r\n"
                        "550 5.1.1 dddddddddddddddddddd\r\n";

    /* room for all: the same as copy_reply */
    check_shorten(four, 200, four, __LINE__);
    /* room for two lines and the final one: whole lines only */
    check_shorten(four, 110,
                  "550-5.1.1 aaaaaaaaaaaaaaaaaaaa\r\n"
                  "550-5.1.1 bbbbbbbbbbbbbbbbbbbb\r\n"
                  "550 5.1.1 dddddddddddddddddddd\r\n", __LINE__);
    check_shorten(four, 40, "550 5.1.1 dddddddddddddddddddd\r\n",
                  __LINE__);
    /* the final line alone is too long: cut, with a CRLF */
    check_shorten(four, 32, "550 5.1.1 dddddddddddddd\r\n", __LINE__);
    check_shorten(four, 31, "", __LINE__);
    check_shorten("250 ok\r\n", 64, "250 2.0.0 ok\r\n", __LINE__);
    check_shorten("250-a\r\n250 b\r\n", 32, "250-2.0.0 a\r\n250 2.0.0 b\r\n",
                  __LINE__);
}


static void
test_dsn_bdat(void)
{
    int             rc;
    u_char          buf[128];
    ngx_smtp_cmd_t  cmd;

#define PARSE(l)                                                              \
    memcpy(buf, l, sizeof(l) - 1);                                            \
    rc = ngx_smtp_parse_command(buf, sizeof(l) - 1, &cmd)

#define STR_IS(s, v)                                                          \
    ((s).len == sizeof(v) - 1 && memcmp((s).data, v, (s).len) == 0)

    PARSE("MAIL FROM:<a@b> ENVID=x+2By SIZE=10 RET=HDRS");
    CHECK(rc == NGX_SMTP_OK && STR_IS(cmd.dsn[0], "RET=HDRS")
          && STR_IS(cmd.dsn[1], "ENVID=x+2By") && cmd.size == 10,
          "MAIL: the DSN parameters as sent, SIZE apart");

    PARSE("MAIL FROM:<a@b> SIZE=10");
    CHECK(rc == NGX_SMTP_OK && cmd.dsn[0].len == 0 && cmd.dsn[1].len == 0,
          "MAIL: no DSN parameters");

    PARSE("RCPT TO:<a@b> ORCPT=rfc822;a@b NOTIFY=DELAY");
    CHECK(rc == NGX_SMTP_OK && STR_IS(cmd.dsn[0], "NOTIFY=DELAY")
          && STR_IS(cmd.dsn[1], "ORCPT=rfc822;a@b"),
          "RCPT: NOTIFY and ORCPT as sent");

    PARSE("BDAT 0 LAST");
    CHECK(rc == NGX_SMTP_OK && cmd.chunk == 0 && cmd.last, "BDAT 0 LAST");

    PARSE("BDAT  99999999999999999999");
    CHECK(rc == NGX_SMTP_E_SYNTAX && cmd.chunk == -1,
          "BDAT: 20 digits are too many");

    PARSE("BDAT 99999999999999999");
    CHECK(rc == NGX_SMTP_OK && cmd.chunk == 99999999999999999LL && !cmd.last,
          "BDAT: 17 digits");

#undef PARSE
#undef STR_IS
}


/* BDAT as DATA: one call and octet by octet give the same */

static void
check_bdat(const char *in, size_t len, int reject, off_t max,
    const char *expect, int bare, int too_big, int line)
{
    size_t           i, n, used, total, elen;
    u_char           out[1024], out2[1024];
    ngx_smtp_bdat_t  b, b2;

    memset(&b, 0, sizeof(b));
    b.reject = reject;
    b.max_size = max;

    n = ngx_smtp_bdat_convert(&b, (u_char *) in, len, out, sizeof(out),
                              &used);
    n += ngx_smtp_bdat_end(&b, out + n);

    memset(&b2, 0, sizeof(b2));
    b2.reject = reject;
    b2.max_size = max;
    total = 0;

    /* one octet at a time, through the least room allowed */

    for (i = 0; i < len; i += used) {
        total += ngx_smtp_bdat_convert(&b2, (u_char *) in + i, 1,
                                       out2 + total,
                                       NGX_SMTP_BDAT_GROWTH, &used);
    }

    total += ngx_smtp_bdat_end(&b2, out2 + total);

    elen = strlen(expect);

    if (n == elen && memcmp(out, expect, n) == 0
        && total == n && memcmp(out2, out, n) == 0
        && b.bare == bare && b.too_big == too_big
        && b2.bare == b.bare && b2.too_big == b.too_big
        && b.size == (off_t) len && b2.size == b.size)
    {
        passed++;

    } else {
        failed++;
        printf("FAIL %s:%d: bdat \"%s\" gave \"%s\" / \"%s\" bare %d "
               "too_big %d\n", __FILE__, line, show((u_char *) in, len),
               show(out, n), show(out2, total), b.bare, b.too_big);
    }
}


#define BDAT(in, rej, max, out, bare, big)                                    \
    check_bdat(in, sizeof(in) - 1, rej, max, out, bare, big, __LINE__)


static void
test_bdat(void)
{
    BDAT("", 0, 0, ".\r\n", 0, 0);
    BDAT("a\r\n", 0, 0, "a\r\n.\r\n", 0, 0);
    BDAT("a", 0, 0, "a\r\n.\r\n", 0, 0);
    BDAT(".\r\n", 0, 0, "..\r\n.\r\n", 0, 0);
    BDAT("a\r\n.\r\nMAIL FROM:<x>\r\n", 0, 0,
         "a\r\n..\r\nMAIL FROM:<x>\r\n.\r\n", 0, 0);
    BDAT("..a\r\n", 0, 0, "...a\r\n.\r\n", 0, 0);
    BDAT("a.b\r\n.c", 0, 0, "a.b\r\n..c\r\n.\r\n", 0, 0);

    /* bare line ends: normalised, or flagged with output stopped (what
       was written stays: the glue then never ends the message) */
    BDAT("a\n.\nb", 0, 0, "a\r\n..\r\nb\r\n.\r\n", 1, 0);
    BDAT("a\r.\rb", 0, 0, "a\r\n..\r\nb\r\n.\r\n", 1, 0);
    BDAT("a\r", 0, 0, "a\r\n.\r\n", 1, 0);
    BDAT("a\r\r\n", 0, 0, "a\r\n\r\n.\r\n", 1, 0);
    BDAT("a\n.\nb", 1, 0, "a", 1, 0);
    BDAT("a\r", 1, 0, "a", 1, 0);
    BDAT("a\r\nb\r\n", 1, 0, "a\r\nb\r\n.\r\n", 0, 0);

    /* size: counted as received, output stops past the limit */
    BDAT("abcdef", 0, 6, "abcdef\r\n.\r\n", 0, 0);
    BDAT("abcdefg", 0, 6, "abcdef", 0, 1);
    BDAT("ab\r\ncdefg", 0, 6, "ab\r\ncd", 0, 1);
}


static void
test_xtext(void)
{
    size_t  n;
    u_char  buf[64];

    n = ngx_smtp_xtext_encode(NULL, (u_char *) "a+b=c d", 7);
    CHECK(n == 13, "xtext length %zu", n);

    n = ngx_smtp_xtext_encode(buf, (u_char *) "a+b=c d", 7);
    CHECK(n == 13 && memcmp(buf, "a+2Bb+3Dc+20d", 13) == 0, "xtext \"%s\"",
          show(buf, n));

    n = ngx_smtp_xtext_encode(buf, (u_char *) "[UNAVAILABLE]", 13);
    CHECK(n == 13 && memcmp(buf, "[UNAVAILABLE]", 13) == 0,
          "xtext passthrough");

    n = ngx_smtp_xtext_encode(buf, (u_char *) "\xc3\xa9\x7f\x01!~", 6);
    CHECK(n == 14 && memcmp(buf, "+C3+A9+7F+01!~", 14) == 0, "xtext \"%s\"",
          show(buf, n));

    n = ngx_smtp_xtext_encode(buf, (u_char *) "", 0);
    CHECK(n == 0, "xtext empty");
}


/* ---- the DATA scanner --------------------------------------------------- */

typedef struct {
    u_char     out[4096];
    size_t     out_len;
    size_t     in_used;
    int        rc;
    off_t      size;
    unsigned   bare;
    unsigned   too_big;
    int        stalled;
} data_result_t;


/*
 * Feeds [in, in + len) in chunks: split[] lists chunk ends (ascending,
 * the last one is len); each chunk is copied to a buffer of exactly its
 * size, and out is a buffer of exactly room octets, so that ASan catches
 * any access outside them.
 */

static void
data_run(const u_char *in, size_t len, int reject, off_t max, size_t *split,
    size_t nsplit, size_t room, data_result_t *res)
{
    int              rc;
    size_t           pos, end, k, iu, ou, spins;
    u_char          *chunk, *out;
    ngx_smtp_data_t  d;

    memset(&d, 0, sizeof(d));
    d.max_size = max;
    d.reject = reject;

    memset(res, 0, sizeof(data_result_t));
    res->rc = NGX_SMTP_AGAIN;

    out = malloc(room);
    pos = 0;
    spins = 0;

    for (k = 0; k < nsplit && res->rc == NGX_SMTP_AGAIN; k++) {
        end = split[k];

        if (end > len) {
            res->stalled = 1;
            goto done;
        }

        while (pos < end) {
            chunk = malloc(end - pos);
            memcpy(chunk, in + pos, end - pos);

            rc = ngx_smtp_data_scan(&d, chunk, chunk + (end - pos), out,
                                    out + room, &iu, &ou);
            free(chunk);

            if (ou > room || iu > end - pos
                || res->out_len + ou > sizeof(res->out))
            {
                res->stalled = 1;
                goto done;
            }

            memcpy(res->out + res->out_len, out, ou);
            res->out_len += ou;
            pos += iu;

            if (rc == NGX_SMTP_OK) {
                res->rc = rc;
                break;
            }

            if (iu == 0 && ou == 0 && ++spins > 3) {
                res->stalled = 1;
                goto done;
            }
        }
    }

done:

    free(out);

    res->in_used = pos;
    res->size = d.size;
    res->bare = d.bare;
    res->too_big = d.too_big;
}


/*
 * An independent, line-at-a-time model of the scanner: what the backend
 * must receive for the whole input.
 */

static void
data_model(const u_char *in, size_t n, int reject, off_t max,
    data_result_t *res)
{
    int      clean, prev_clean, dot, bare;
    size_t   i, j, tl, slen, cut, L;
    u_char  *s;

    memset(res, 0, sizeof(data_result_t));
    res->rc = NGX_SMTP_AGAIN;

    s = malloc(2 * n + 8);
    slen = 0;
    prev_clean = 1;
    bare = 0;
    cut = 0;
    i = 0;
    res->in_used = n;

    while (i < n) {
        j = i;

        while (j < n && in[j] != '\r' && in[j] != '\n') {
            j++;
        }

        dot = (j - i == 1 && in[i] == '.');

        if (j == n || (in[j] == '\r' && j + 1 == n)) {
            /* unfinished line: a lone "." is held */
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

    L = slen;

    if (res->too_big && (size_t) max < L) {
        L = max;
    }

    if (reject && bare && cut < L) {
        L = cut;
    }

    if (L > sizeof(res->out) - 3) {
        L = sizeof(res->out) - 3;
    }

    memcpy(res->out, s, L);
    res->out_len = L;

    if (res->rc == NGX_SMTP_OK && !res->too_big && !(reject && bare)) {
        memcpy(res->out + L, ".\r\n", 3);
        res->out_len += 3;
    }

    free(s);
}


static int
data_same(data_result_t *a, data_result_t *b)
{
    return !a->stalled && !b->stalled
           && a->rc == b->rc && a->out_len == b->out_len
           && memcmp(a->out, b->out, a->out_len) == 0
           && a->in_used == b->in_used && a->size == b->size
           && a->bare == b->bare && a->too_big == b->too_big;
}


static void
data_report(const char *what, const u_char *in, size_t len,
    data_result_t *got, data_result_t *want, int line)
{
    failed++;
    printf("FAIL %s:%d: %s, input \"%s\"\n"
           "    got  rc %d out \"%s\" used %zu size %lld bare %u big %u%s\n"
           "    want rc %d out \"%s\" used %zu size %lld bare %u big %u\n",
           __FILE__, line, what, show(in, len),
           got->rc, show(got->out, got->out_len), got->in_used,
           (long long) got->size, got->bare, got->too_big,
           got->stalled ? " STALLED" : "",
           want->rc, show(want->out, want->out_len), want->in_used,
           (long long) want->size, want->bare, want->too_big);
}


/* runs one input every way: whole, every 2-split, bytewise, small out */

static int
data_all_ways(const u_char *in, size_t len, int reject, off_t max,
    data_result_t *want, int line)
{
    int            ok;
    char           what[64];
    size_t         split[3], k, room, bytes[512];
    data_result_t  got;

    ok = 1;

    split[0] = len;
    data_run(in, len, reject, max, split, 1, 4096, &got);

    if (!data_same(&got, want)) {
        data_report("one chunk", in, len, &got, want, line);
        return 0;
    }

    for (k = 0; k <= len; k++) {
        split[0] = k;
        split[1] = len;
        data_run(in, len, reject, max, split, 2, 4096, &got);

        if (!data_same(&got, want)) {
            snprintf(what, sizeof(what), "split at %zu", k);
            data_report(what, in, len, &got, want, line);
            return 0;
        }
    }

    if (len <= 512) {
        for (k = 0; k < len; k++) {
            bytes[k] = k + 1;
        }

        data_run(in, len, reject, max, bytes, len, 4096, &got);

        if (!data_same(&got, want)) {
            data_report("byte at a time", in, len, &got, want, line);
            return 0;
        }

        for (room = 4; room <= 9; room++) {
            data_run(in, len, reject, max, bytes, len, room, &got);

            if (!data_same(&got, want)) {
                snprintf(what, sizeof(what), "bytewise, out room %zu", room);
                data_report(what, in, len, &got, want, line);
                return 0;
            }
        }
    }

    for (room = 4; room <= 12; room++) {
        split[0] = len;
        data_run(in, len, reject, max, split, 1, room, &got);

        if (!data_same(&got, want)) {
            snprintf(what, sizeof(what), "out room %zu", room);
            data_report(what, in, len, &got, want, line);
            return 0;
        }
    }

    return ok;
}


typedef struct {
    const char  *in;
    int          reject;
    long long    max;
    const char  *out;
    int          rc;
    int          bare;
    int          too_big;
    long long    size;      /* -1: not checked */
    long long    used;      /* -1: all input */
} data_test_t;


#define NORM  NGX_SMTP_BARE_LF_NORMALIZE
#define REJ   NGX_SMTP_BARE_LF_REJECT
#define D_OK  NGX_SMTP_OK
#define D_AG  NGX_SMTP_AGAIN

static data_test_t  data_tests[] = {

    /* clean messages */
    { "hello\r\n.\r\n", NORM, 0, "hello\r\n.\r\n", D_OK, 0, 0, 7, -1 },
    { ".\r\n", NORM, 0, ".\r\n", D_OK, 0, 0, 0, -1 },
    { "\r\n.\r\n", NORM, 0, "\r\n.\r\n", D_OK, 0, 0, 2, -1 },
    { "a\r\n\r\n.\r\n", NORM, 0, "a\r\n\r\n.\r\n", D_OK, 0, 0, 5, -1 },
    { "a\r\n.\r\nMAIL FROM:<x@y>\r\n", NORM, 0, "a\r\n.\r\n", D_OK, 0, 0, 3,
      6 },
    { "a\r\n.\r\n.\r\n", NORM, 0, "a\r\n.\r\n", D_OK, 0, 0, 3, 6 },

    /* dot-stuffed lines pass as they are */
    { "..\r\n.\r\n", NORM, 0, "..\r\n.\r\n", D_OK, 0, 0, 4, -1 },
    { "a\r\n..\r\n.\r\n", NORM, 0, "a\r\n..\r\n.\r\n", D_OK, 0, 0, 7, -1 },
    { "a\r\n.b\r\n.\r\n", NORM, 0, "a\r\n.b\r\n.\r\n", D_OK, 0, 0, 7, -1 },
    { "a\r\n...\r\n.\r\n", NORM, 0, "a\r\n...\r\n.\r\n", D_OK, 0, 0, 8,
      -1 },
    { ". \r\n.\r\n", NORM, 0, ". \r\n.\r\n", D_OK, 0, 0, 4, -1 },
    { "a.\r\n.\r\n", NORM, 0, "a.\r\n.\r\n", D_OK, 0, 0, 4, -1 },

    /* smuggling variants, normalize: a dot line that is not the end */
    { "a\n.\nb\r\n.\r\n", NORM, 0, "a\r\n..\r\nb\r\n.\r\n", D_OK, 1, 0, 10,
      -1 },                                                     /* LF.LF */
    { "a\r\n.\nb\r\n.\r\n", NORM, 0, "a\r\n..\r\nb\r\n.\r\n", D_OK, 1, 0,
      10, -1 },                                                 /* CRLF.LF */
    { "a\n.\r\nb\r\n.\r\n", NORM, 0, "a\r\n..\r\nb\r\n.\r\n", D_OK, 1, 0,
      10, -1 },                                                 /* LF.CRLF */
    { "a\r.\r\nb\r\n.\r\n", NORM, 0, "a\r\n..\r\nb\r\n.\r\n", D_OK, 1, 0,
      10, -1 },                                                 /* CR.CRLF */
    { "a\r\n.\rb\r\n.\r\n", NORM, 0, "a\r\n..\r\nb\r\n.\r\n", D_OK, 1, 0,
      10, -1 },                                                 /* CRLF.CR */
    { "a\r.\rb\r\n.\r\n", NORM, 0, "a\r\n..\r\nb\r\n.\r\n", D_OK, 1, 0, 10,
      -1 },                                                     /* CR.CR */
    { "a\n.\rb\r\n.\r\n", NORM, 0, "a\r\n..\r\nb\r\n.\r\n", D_OK, 1, 0, 10,
      -1 },                                                     /* LF.CR */
    { "a\r.\nb\r\n.\r\n", NORM, 0, "a\r\n..\r\nb\r\n.\r\n", D_OK, 1, 0, 10,
      -1 },                                                     /* CR.LF */
    { "\n.\n", NORM, 0, "\r\n..\r\n", D_AG, 1, 0, 6, -1 },
    { "\n.\r\n", NORM, 0, "\r\n..\r\n", D_AG, 1, 0, 6, -1 },
    { ".\n", NORM, 0, "..\r\n", D_AG, 1, 0, 4, -1 },
    { ".\r", NORM, 0, "", D_AG, 0, 0, 0, -1 },
    { ".\rX", NORM, 0, "..\r\nX", D_AG, 1, 0, 5, -1 },
    { "\r\n.\n.\r\n", NORM, 0, "\r\n..\r\n..\r\n", D_AG, 1, 0, 10, -1 },
    { "a\r\n.\r\r\n.\r\n", NORM, 0, "a\r\n..\r\n\r\n.\r\n", D_OK, 1, 0, 9,
      -1 },
    { "a\r\n.\r.\r\n.\r\n", NORM, 0, "a\r\n..\r\n..\r\n.\r\n", D_OK, 1, 0,
      11, -1 },
    { "a\r\n.\n\r\n.\r\n", NORM, 0, "a\r\n..\r\n\r\n.\r\n", D_OK, 1, 0, 9,
      -1 },
    /* a real CRLF.CRLF right after a bare line ending still ends data */
    { "a\n\r\n.\r\n", NORM, 0, "a\r\n\r\n.\r\n", D_OK, 1, 0, 5, -1 },

    /* bare CR and LF inside lines */
    { "a\rb\nc\r\n.\r\n", NORM, 0, "a\r\nb\r\nc\r\n.\r\n", D_OK, 1, 0, 9,
      -1 },
    { "a\r\r\n.\r\n", NORM, 0, "a\r\n\r\n.\r\n", D_OK, 1, 0, 5, -1 },
    { "a\n\n.\r\n", NORM, 0, "a\r\n\r\n..\r\n", D_AG, 1, 0, 9, -1 },
    { "a\r\r.\r\n", NORM, 0, "a\r\n\r\n..\r\n", D_AG, 1, 0, 9, -1 },
    { "\r", NORM, 0, "", D_AG, 0, 0, 0, -1 },
    { "\r\r", NORM, 0, "\r\n", D_AG, 1, 0, 2, -1 },
    { "abc", NORM, 0, "abc", D_AG, 0, 0, 3, -1 },
    { "abc\r\n.", NORM, 0, "abc\r\n", D_AG, 0, 0, 5, -1 },
    { "abc\r\n.\r", NORM, 0, "abc\r\n", D_AG, 0, 0, 5, -1 },

    /* NUL and 8-bit octets are passed through */
    { "\x00" "a\x00\xff\r\n.\r\n", NORM, 0, "\x00" "a\x00\xff\r\n.\r\n",
      D_OK, 0, 0, 6, -1 },

    /* reject mode: nothing is written after the first bare CR or LF */
    { "hello\r\n.\r\n", REJ, 0, "hello\r\n.\r\n", D_OK, 0, 0, 7, -1 },
    { "a\nb\r\n.\r\n", REJ, 0, "a", D_OK, 1, 0, 6, -1 },
    { "a\rb\r\n.\r\n", REJ, 0, "a", D_OK, 1, 0, 6, -1 },
    { "a\r\n.\nX\r\n.\r\n", REJ, 0, "a\r\n", D_OK, 1, 0, 10, -1 },
    { "a\r\n.\rX\r\n.\r\n", REJ, 0, "a\r\n", D_OK, 1, 0, 10, -1 },
    { "a\n.\r\nb\r\n.\r\n", REJ, 0, "a", D_OK, 1, 0, 10, -1 },
    { "a\r.\r\nb\r\n.\r\n", REJ, 0, "a", D_OK, 1, 0, 10, -1 },
    { "a\r\n.\r.\r\n.\r\n", REJ, 0, "a\r\n", D_OK, 1, 0, 11, -1 },
    { "\n.\r\n", REJ, 0, "", D_AG, 1, 0, 6, -1 },
    { "abc\r\r\nmore\r\n.\r\nNOOP\r\n", REJ, 0, "abc", D_OK, 1, 0, 13,
      15 },

    /* size limit: limit octets are fine, limit + 1 are too big */
    { "abc\r\n.\r\n", NORM, 5, "abc\r\n.\r\n", D_OK, 0, 0, 5, -1 },
    { "abc\r\n.\r\n", NORM, 4, "abc\r", D_OK, 0, 1, 5, -1 },
    { "abcd\r\n.\r\n", NORM, 5, "abcd\r", D_OK, 0, 1, 6, -1 },
    { "..\r\n.\r\n", NORM, 4, "..\r\n.\r\n", D_OK, 0, 0, 4, -1 },
    { "..\r\n.\r\n", NORM, 3, "..\r", D_OK, 0, 1, 4, -1 },
    { "a\nb\r\n.\r\n", NORM, 6, "a\r\nb\r\n.\r\n", D_OK, 1, 0, 6, -1 },
    { "a\nb\r\n.\r\n", NORM, 5, "a\r\nb\r", D_OK, 1, 1, 6, -1 },
    { "a\n.\nb\r\n.\r\n", NORM, 4, "a\r\n.", D_OK, 1, 1, 10, -1 },
    { "abcdefgh\r\n.\r\n", NORM, 1, "a", D_OK, 0, 1, 10, -1 },
    { "abcdefgh\r\n.\r\n", REJ, 4, "abcd", D_OK, 0, 1, 10, -1 },
    { "ab\ncdefgh\r\n.\r\n", REJ, 4, "ab", D_OK, 1, 1, 12, -1 },

    { NULL, 0, 0, NULL, 0, 0, 0, 0, 0 }
};


static size_t
data_test_len(const char *s)
{
    /* the one input with a leading NUL */
    if (s[0] == '\0') {
        return 9;
    }

    return strlen(s);
}


static void
test_data_vectors(void)
{
    size_t         len, olen;
    data_test_t   *t;
    data_result_t  want, model;

    for (t = data_tests; t->in; t++) {
        len = data_test_len(t->in);
        olen = (t->out[0] == '\0' && t->in[0] == '\0') ? 9 : strlen(t->out);

        memset(&want, 0, sizeof(want));
        memcpy(want.out, t->out, olen);
        want.out_len = olen;
        want.rc = t->rc;
        want.bare = t->bare;
        want.too_big = t->too_big;
        want.size = t->size;
        want.in_used = (t->used == -1) ? len : (size_t) t->used;

        /* the model must agree with the hand-written expectation */
        data_model((u_char *) t->in, len, t->reject, t->max, &model);

        if (!data_same(&model, &want)) {
            data_report("model", (u_char *) t->in, len, &model, &want,
                        __LINE__);
            continue;
        }

        passed++;

        if (data_all_ways((u_char *) t->in, len, t->reject, t->max, &want,
                          __LINE__))
        {
            passed++;
        }
    }
}


/* random short inputs over the interesting octets, against the model */

static void
test_data_random(void)
{
    int            reject, bad;
    off_t          max;
    size_t         len, i, k, nsplit, split[64], room;
    u_char         in[64];
    unsigned long  seed;
    data_result_t  want, got;
    static u_char  alphabet[] = "\r\n.a\r\n.\r\n";

    seed = 12345;
    bad = 0;

#define RND()  (seed = seed * 6364136223846793005UL + 1442695040888963407UL, \
                (unsigned) (seed >> 33))

    for (i = 0; i < 200000 && bad < 5; i++) {
        len = RND() % 24;

        for (k = 0; k < len; k++) {
            in[k] = alphabet[RND() % (sizeof(alphabet) - 1)];
        }

        reject = RND() % 2;
        max = (RND() % 3 == 0) ? (off_t) (RND() % 16) : 0;
        room = (RND() % 2) ? 4 + RND() % 8 : 256;

        nsplit = 0;

        for (k = 1; k < len; k++) {
            if (RND() % 3 == 0) {
                split[nsplit++] = k;
            }
        }

        split[nsplit++] = len;

        data_model(in, len, reject, max, &want);
        data_run(in, len, reject, max, split, nsplit, room, &got);

        if (!data_same(&got, &want)) {
            data_report(reject ? "random, reject" : "random, normalize",
                        in, len, &got, &want, __LINE__);
            bad++;
        }
    }

    if (bad == 0) {
        passed++;
    }
}


/* a big clean message through a small output buffer */

static void
test_data_big(void)
{
    int              rc;
    size_t           i, n, iu, ou, total_in, total_out;
    u_char          *in, *out, *p;
    ngx_smtp_data_t  d;

    n = 1 << 20;
    in = malloc(n + 5);
    out = malloc(n + 5);

    for (i = 0; i < n; i++) {
        in[i] = (i % 78 == 76) ? '\r' : (i % 78 == 77) ? '\n' : 'x';
    }

    in[n - 2] = '\r';
    in[n - 1] = '\n';
    memcpy(in + n, ".\r\n", 3);

    memset(&d, 0, sizeof(d));
    d.max_size = n;

    p = in;
    total_out = 0;

    do {
        rc = ngx_smtp_data_scan(&d, p, in + n + 3, out + total_out,
                                out + total_out + 1000, &iu, &ou);
        p += iu;
        total_out += ou;
    } while (rc == NGX_SMTP_AGAIN && (iu || ou));

    total_in = p - in;

    CHECK(rc == NGX_SMTP_OK && total_in == n + 3 && total_out == n + 3
          && memcmp(in, out, n + 3) == 0 && (size_t) d.size == n
          && !d.too_big && !d.bare,
          "1 MB message: rc %d in %zu out %zu size %lld", rc, total_in,
          total_out, (long long) d.size);

    /* called again after the end: nothing more */
    rc = ngx_smtp_data_scan(&d, in, in + 10, out, out + 10, &iu, &ou);
    CHECK(rc == NGX_SMTP_OK && iu == 0 && ou == 0, "after the end");

    free(in);
    free(out);
}


/*
 * The zero-copy path: verbatim runs sent from the input plus the scanner
 * for the rest give exactly what the scanner alone gives, at every split.
 */

static void
test_data_verbatim(void)
{
    int              rc;
    size_t           i, k, split, iu, ou, v, ref_len, got_len, len;
    u_char           ref[256], got[256], out[256];
    u_char          *p, *last;
    ngx_smtp_data_t  d;

    static const char  *vectors[] = {
        "Subject: x\r\n\r\nline one\r\nline two\r\n.\r\n",
        "a\r\n..dot\r\nb\nc\rd\r\n.\n.\r\n\r\n.\r\n",
        "text\r\n.\r",
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n"
        "yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy\r\n.\r\n",
    };

    for (k = 0; k < sizeof(vectors) / sizeof(vectors[0]); k++) {
        len = strlen(vectors[k]);

        /* the scanner alone */

        memset(&d, 0, sizeof(d));
        d.max_size = 100;
        rc = ngx_smtp_data_scan(&d, (u_char *) vectors[k],
                                (u_char *) vectors[k] + len, ref,
                                ref + sizeof(ref), &iu, &ref_len);
        (void) rc;

        for (split = 0; split <= len; split++) {
            memset(&d, 0, sizeof(d));
            d.max_size = 100;
            got_len = 0;

            p = (u_char *) vectors[k];

            for (i = 0; i < 2; i++) {
                last = (i == 0) ? (u_char *) vectors[k] + split
                                : (u_char *) vectors[k] + len;

                while (p < last) {
                    v = ngx_smtp_data_verbatim(&d, p, last, 1);

                    if (v) {
                        memcpy(got + got_len, p, v);
                        got_len += v;
                        p += v;
                        continue;
                    }

                    rc = ngx_smtp_data_scan(&d, p, last, out,
                                            out + sizeof(out), &iu, &ou);
                    memcpy(got + got_len, out, ou);
                    got_len += ou;
                    p += iu;

                    if (rc == NGX_SMTP_OK || (iu == 0 && ou == 0)) {
                        break;
                    }
                }
            }

            CHECK(got_len == ref_len && memcmp(got, ref, ref_len) == 0,
                  "verbatim vector %zu split %zu: %s, expected %s", k, split,
                  show(got, got_len), show(ref, ref_len));
        }
    }

    /* a limit: never past it, and nothing held or at a dot */

    memset(&d, 0, sizeof(d));
    d.max_size = 10;
    v = ngx_smtp_data_verbatim(&d, (u_char *) "0123456789abc\r\n",
                               (u_char *) "0123456789abc\r\n" + 15, 1);
    CHECK(v == 10 && d.size == 10, "verbatim stops at the limit: %zu", v);

    memset(&d, 0, sizeof(d));
    v = ngx_smtp_data_verbatim(&d, (u_char *) ".\r\n", (u_char *) ".\r\n" + 3,
                               1);
    CHECK(v == 0 && d.state == 0, "verbatim leaves a dot line alone");

    memset(&d, 0, sizeof(d));
    p = (u_char *) "abc\r\ndef";
    v = ngx_smtp_data_verbatim(&d, p, p + 8, 100);
    CHECK(v == 0 && d.size == 0, "verbatim below min changes nothing");
}


int
main(void)
{
    test_find_line();
    test_commands();
    test_command_details();
    test_replies();
    test_ehlo();
    test_copy_reply();
    test_shorten_reply();
    test_xtext();
    test_dsn_bdat();
    test_bdat();
    test_data_vectors();
    test_data_random();
    test_data_big();
    test_data_verbatim();

    printf("%u passed, %u failed\n", passed, failed);

    return failed ? 1 : 0;
}
