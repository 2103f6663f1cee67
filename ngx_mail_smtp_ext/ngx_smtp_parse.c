
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE
#endif

#include <string.h>

#include "ngx_smtp_core.h"


#define NGX_SMTP_SIZE_DIGITS  20

#include "ngx_smtp_chars.h"


typedef struct {
    const char             *name;
    size_t                  len;
    ngx_smtp_cmd_e          cmd;
} ngx_smtp_verb_t;


static int ngx_smtp_caseless_eq(u_char *p, const char *s, size_t len);
static int ngx_smtp_parse_path_cmd(ngx_smtp_cmd_t *cmd, u_char *p,
    u_char *last, const char *kw, size_t kwlen, int mail);
static int ngx_smtp_parse_path(ngx_smtp_cmd_t *cmd, u_char **pp,
    u_char *last, int mail);
static int ngx_smtp_parse_domain(u_char **pp, u_char *last);
static int ngx_smtp_parse_bdat(ngx_smtp_cmd_t *cmd);
static u_char *ngx_smtp_next_param(u_char *p, u_char *last, u_char **kw,
    size_t *kwlen, u_char **val, size_t *vlen, unsigned *has_val);
static int ngx_smtp_parse_rcpt_params(ngx_smtp_cmd_t *cmd, u_char *p,
    u_char *last);
static int ngx_smtp_xtext_valid(u_char *p, size_t len);
static void ngx_smtp_dsn_add(ngx_smtp_cmd_t *cmd, unsigned i, u_char *kw,
    u_char *end);
static int ngx_smtp_parse_params(ngx_smtp_cmd_t *cmd, u_char *p,
    u_char *last);
static int ngx_smtp_parse_auth(ngx_smtp_cmd_t *cmd);


static const ngx_smtp_verb_t  ngx_smtp_verbs[] = {
    { "helo", 4, NGX_SMTP_CMD_HELO },
    { "ehlo", 4, NGX_SMTP_CMD_EHLO },
    { "mail", 4, NGX_SMTP_CMD_MAIL },
    { "rcpt", 4, NGX_SMTP_CMD_RCPT },
    { "data", 4, NGX_SMTP_CMD_DATA },
    { "rset", 4, NGX_SMTP_CMD_RSET },
    { "noop", 4, NGX_SMTP_CMD_NOOP },
    { "quit", 4, NGX_SMTP_CMD_QUIT },
    { "vrfy", 4, NGX_SMTP_CMD_VRFY },
    { "expn", 4, NGX_SMTP_CMD_EXPN },
    { "help", 4, NGX_SMTP_CMD_HELP },
    { "starttls", 8, NGX_SMTP_CMD_STARTTLS },
    { "auth", 4, NGX_SMTP_CMD_AUTH },
    { "bdat", 4, NGX_SMTP_CMD_BDAT },
    { NULL, 0, NGX_SMTP_CMD_UNKNOWN }
};


int
ngx_smtp_find_line(u_char *p, u_char *last, size_t max,
    ngx_smtp_line_t *line)
{
    u_char  *lf;
    size_t   len;

    line->start = p;

    lf = memchr(p, '\n', last - p);

    if (lf == NULL) {
        if ((size_t) (last - p) < max) {
            return NGX_SMTP_AGAIN;
        }

        /* even a CRLF right now would make the line too long */
        line->len = 0;
        line->consumed = last - p;
        return NGX_SMTP_LINE_TOO_LONG;
    }

    len = lf - p;

    if (len && lf[-1] == '\r') {
        len--;
    }

    line->consumed = lf - p + 1;

    /* the limit counts the line as if it ended with CRLF */
    if (len + 2 > max) {
        line->len = 1;
        return NGX_SMTP_LINE_TOO_LONG;
    }

    line->len = len;

    return NGX_SMTP_OK;
}


int
ngx_smtp_parse_command(u_char *line, size_t len, ngx_smtp_cmd_t *cmd)
{
    u_char                 *p, *q, *last;
    size_t                  n;
    const ngx_smtp_verb_t  *v;

    memset(cmd, 0, sizeof(ngx_smtp_cmd_t));
    cmd->size = -1;
    cmd->chunk = -1;

    p = line;
    last = line + len;

    while (p < last && *p != ' ') {
        p++;
    }

    n = p - line;

    for (v = ngx_smtp_verbs; v->name; v++) {
        if (v->len == n && ngx_smtp_caseless_eq(line, v->name, n)) {
            break;
        }
    }

    if (v->name == NULL) {
        return NGX_SMTP_E_UNKNOWN;
    }

    cmd->cmd = v->cmd;

    /* NUL, TAB, a stray CR and the like never reach a backend */
    for (q = p; q < last; q++) {
        if (ngx_smtp_ctl(*q)) {
            return NGX_SMTP_E_SYNTAX;
        }
    }

    while (p < last && *p == ' ') {
        p++;
    }

    while (last > p && last[-1] == ' ') {
        last--;
    }

    cmd->arg.data = p;
    cmd->arg.len = last - p;

    switch (cmd->cmd) {

    case NGX_SMTP_CMD_HELO:
    case NGX_SMTP_CMD_EHLO:
        return cmd->arg.len ? NGX_SMTP_OK : NGX_SMTP_E_SYNTAX;

    case NGX_SMTP_CMD_DATA:
    case NGX_SMTP_CMD_RSET:
    case NGX_SMTP_CMD_QUIT:
    case NGX_SMTP_CMD_STARTTLS:
        return cmd->arg.len ? NGX_SMTP_E_SYNTAX : NGX_SMTP_OK;

    case NGX_SMTP_CMD_MAIL:
        return ngx_smtp_parse_path_cmd(cmd, p, last, "from:", 5, 1);

    case NGX_SMTP_CMD_RCPT:
        return ngx_smtp_parse_path_cmd(cmd, p, last, "to:", 3, 0);

    case NGX_SMTP_CMD_AUTH:
        return ngx_smtp_parse_auth(cmd);

    case NGX_SMTP_CMD_BDAT:
        return ngx_smtp_parse_bdat(cmd);

    default:
        /* NOOP, VRFY, HELP, and EXPN that the glue refuses */
        return NGX_SMTP_OK;
    }
}


static int
ngx_smtp_caseless_eq(u_char *p, const char *s, size_t len)
{
    size_t  i;

    for (i = 0; i < len; i++) {
        if (ngx_smtp_lc(p[i]) != (u_char) s[i]) {
            return 0;
        }
    }

    return 1;
}


static int
ngx_smtp_parse_path_cmd(ngx_smtp_cmd_t *cmd, u_char *p, u_char *last,
    const char *kw, size_t kwlen, int mail)
{
    int  rc;

    if ((size_t) (last - p) < kwlen || !ngx_smtp_caseless_eq(p, kw, kwlen)) {
        return NGX_SMTP_E_SYNTAX;
    }

    p += kwlen;

    while (p < last && *p == ' ') {
        p++;
    }

    if (p == last || *p != '<') {
        return NGX_SMTP_E_SYNTAX;
    }

    p++;

    rc = ngx_smtp_parse_path(cmd, &p, last, mail);
    if (rc != NGX_SMTP_OK) {
        return rc;
    }

    if (p < last) {
        if (*p != ' ') {
            return NGX_SMTP_E_SYNTAX;
        }

        while (p < last && *p == ' ') {
            p++;
        }
    }

    cmd->params.data = p;
    cmd->params.len = last - p;

    if (!mail) {
        /* the SMTPUTF8 decision belongs to the transaction: the glue's */
        return ngx_smtp_parse_rcpt_params(cmd, p, last);
    }

    rc = ngx_smtp_parse_params(cmd, p, last);
    if (rc != NGX_SMTP_OK) {
        return rc;
    }

    if (cmd->utf8_path && !cmd->smtputf8) {
        return NGX_SMTP_E_UTF8;
    }

    return NGX_SMTP_OK;
}


/* atext of RFC 5322, plus UTF-8 octets (RFC 6531) */

static int
ngx_smtp_atext(u_char c)
{
    if (ngx_smtp_alpha(c) || ngx_smtp_digit(c) || c >= 0x80) {
        return 1;
    }

    return strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL && c != '\0';
}


static int
ngx_smtp_parse_path(ngx_smtp_cmd_t *cmd, u_char **pp, u_char *last, int mail)
{
    u_char  *p, *start, *local, *q;
    size_t   n;

    p = *pp;

    if (p < last && *p == '>') {
        if (!mail) {
            return NGX_SMTP_E_SYNTAX;
        }

        cmd->null_path = 1;
        cmd->path.data = p;
        cmd->path.len = 0;
        *pp = p + 1;
        return NGX_SMTP_OK;
    }

    /* an obsolete source route "@a,@b:" is accepted and dropped */

    if (p < last && *p == '@') {
        for ( ;; ) {
            p++;

            if (ngx_smtp_parse_domain(&p, last) != NGX_SMTP_OK
                || p == last)
            {
                return NGX_SMTP_E_SYNTAX;
            }

            if (*p == ':') {
                p++;
                break;
            }

            if (*p != ',' || p + 1 == last || p[1] != '@') {
                return NGX_SMTP_E_SYNTAX;
            }

            p++;
        }
    }

    start = p;

    /* local part */

    if (p < last && *p == '"') {
        p++;

        for ( ;; ) {
            if (p == last) {
                return NGX_SMTP_E_SYNTAX;
            }

            if (*p == '"') {
                p++;
                break;
            }

            if (*p == '\\') {
                p++;

                /* control octets were refused for the whole line */
                if (p == last) {
                    return NGX_SMTP_E_SYNTAX;
                }
            }

            p++;
        }

    } else {
        for ( ;; ) {
            local = p;

            while (p < last && ngx_smtp_atext(*p)) {
                p++;
            }

            if (p == local) {
                return NGX_SMTP_E_SYNTAX;
            }

            if (p < last && *p == '.') {
                p++;
                continue;
            }

            break;
        }
    }

    local = p;

    if (p < last && *p == '@') {
        p++;

        if (p < last && *p == '[') {
            /* address literal: [1.2.3.4], [IPv6:...], tag:content */
            p++;
            q = p;

            while (p < last && *p != ']') {
                if (*p <= ' ' || *p >= 0x7f || *p == '[' || *p == '\\') {
                    return NGX_SMTP_E_SYNTAX;
                }

                p++;
            }

            if (p == last || p == q) {
                return NGX_SMTP_E_SYNTAX;
            }

            p++;

        } else if (ngx_smtp_parse_domain(&p, last) != NGX_SMTP_OK) {
            return NGX_SMTP_E_SYNTAX;
        }

    } else {
        /* RFC 5321 4.5.1: "<postmaster>" is a valid recipient */
        if (mail || local - start != 10
            || !ngx_smtp_caseless_eq(start, "postmaster", 10))
        {
            return NGX_SMTP_E_SYNTAX;
        }
    }

    if (p == last || *p != '>') {
        return NGX_SMTP_E_SYNTAX;
    }

    cmd->path.data = start;
    cmd->path.len = p - start;

    for (n = 0; n < cmd->path.len; n++) {
        if (start[n] >= 0x80) {
            cmd->utf8_path = 1;
            break;
        }
    }

    *pp = p + 1;

    return NGX_SMTP_OK;
}


/* dot-separated labels of letters, digits, '-' or UTF-8 octets */

static int
ngx_smtp_parse_domain(u_char **pp, u_char *last)
{
    u_char  *p, *label;

    p = *pp;

    for ( ;; ) {
        label = p;

        while (p < last
               && (ngx_smtp_alpha(*p) || ngx_smtp_digit(*p) || *p == '-'
                   || *p >= 0x80))
        {
            p++;
        }

        if (p == label) {
            return NGX_SMTP_E_SYNTAX;
        }

        if (p < last && *p == '.') {
            p++;
            continue;
        }

        *pp = p;
        return NGX_SMTP_OK;
    }
}


static int
ngx_smtp_parse_params(ngx_smtp_cmd_t *cmd, u_char *p, u_char *last)
{
    u_char    *kw, *val, *q;
    size_t     kwlen, vlen;
    off_t      size;
    unsigned   has_val, seen_auth, seen_ret, seen_envid;

    seen_auth = 0;
    seen_ret = 0;
    seen_envid = 0;

    while (p < last) {
        p = ngx_smtp_next_param(p, last, &kw, &kwlen, &val, &vlen, &has_val);

        if (kwlen == 4 && ngx_smtp_caseless_eq(kw, "size", 4)) {

            if (cmd->size != -1 || vlen == 0 || vlen > NGX_SMTP_SIZE_DIGITS) {
                return NGX_SMTP_E_PARAM;
            }

            size = 0;

            for (q = val; q < val + vlen; q++) {
                if (!ngx_smtp_digit(*q)
                    || size > (NGX_SMTP_OFF_T_MAX - (*q - '0')) / 10)
                {
                    return NGX_SMTP_E_PARAM;
                }

                size = size * 10 + (*q - '0');
            }

            cmd->size = size;

        } else if (kwlen == 4 && ngx_smtp_caseless_eq(kw, "body", 4)) {

            if (cmd->body != NGX_SMTP_BODY_NONE) {
                return NGX_SMTP_E_PARAM;
            }

            if (vlen == 4 && ngx_smtp_caseless_eq(val, "7bit", 4)) {
                cmd->body = NGX_SMTP_BODY_7BIT;

            } else if (vlen == 8 && ngx_smtp_caseless_eq(val, "8bitmime", 8)) {
                cmd->body = NGX_SMTP_BODY_8BITMIME;

            } else {
                return NGX_SMTP_E_PARAM;
            }

        } else if (kwlen == 8 && ngx_smtp_caseless_eq(kw, "smtputf8", 8)) {

            if (cmd->smtputf8 || has_val) {
                return NGX_SMTP_E_PARAM;
            }

            cmd->smtputf8 = 1;

        } else if (kwlen == 4 && ngx_smtp_caseless_eq(kw, "auth", 4)) {

            if (seen_auth || vlen == 0) {
                return NGX_SMTP_E_PARAM;
            }

            /* xtext is printable ASCII */
            for (q = val; q < val + vlen; q++) {
                if (*q >= 0x80) {
                    return NGX_SMTP_E_PARAM;
                }
            }

            seen_auth = 1;
            cmd->auth.data = val;
            cmd->auth.len = vlen;

        } else if (kwlen == 3 && ngx_smtp_caseless_eq(kw, "ret", 3)) {

            if (seen_ret) {
                return NGX_SMTP_E_PARAM;
            }

            if (!(vlen == 4 && ngx_smtp_caseless_eq(val, "full", 4))
                && !(vlen == 4 && ngx_smtp_caseless_eq(val, "hdrs", 4)))
            {
                return NGX_SMTP_E_SYNTAX;
            }

            seen_ret = 1;
            ngx_smtp_dsn_add(cmd, 0, kw, val + vlen);

        } else if (kwlen == 5 && ngx_smtp_caseless_eq(kw, "envid", 5)) {

            if (seen_envid) {
                return NGX_SMTP_E_PARAM;
            }

            if (vlen == 0 || vlen > 100 || !ngx_smtp_xtext_valid(val, vlen)) {
                return NGX_SMTP_E_SYNTAX;
            }

            seen_envid = 1;
            ngx_smtp_dsn_add(cmd, 1, kw, val + vlen);

        } else {
            return NGX_SMTP_E_PARAM;
        }
    }

    return NGX_SMTP_OK;
}


/*
 * One "KEYWORD[=value]" of a MAIL or RCPT line and the spaces after it;
 * returns where the next one starts.
 */

static u_char *
ngx_smtp_next_param(u_char *p, u_char *last, u_char **kw, size_t *kwlen,
    u_char **val, size_t *vlen, unsigned *has_val)
{
    *kw = p;

    while (p < last && *p != ' ' && *p != '=') {
        p++;
    }

    *kwlen = p - *kw;
    *val = NULL;
    *vlen = 0;
    *has_val = 0;

    if (p < last && *p == '=') {
        p++;
        *val = p;

        while (p < last && *p != ' ') {
            p++;
        }

        *vlen = p - *val;
        *has_val = 1;
    }

    while (p < last && *p == ' ') {
        p++;
    }

    return p;
}


/* RCPT: NOTIFY= and ORCPT= only (RFC 3461 4.1, 4.2) */

static int
ngx_smtp_parse_rcpt_params(ngx_smtp_cmd_t *cmd, u_char *p, u_char *last)
{
    u_char    *kw, *val, *q, *w;
    size_t     kwlen, vlen;
    unsigned   has_val, seen_notify, seen_orcpt, never, other;

    seen_notify = 0;
    seen_orcpt = 0;

    while (p < last) {
        p = ngx_smtp_next_param(p, last, &kw, &kwlen, &val, &vlen, &has_val);

        if (kwlen == 6 && ngx_smtp_caseless_eq(kw, "notify", 6)) {

            if (seen_notify) {
                return NGX_SMTP_E_PARAM;
            }

            if (vlen == 0) {
                return NGX_SMTP_E_SYNTAX;
            }

            /* NEVER alone, or a list of SUCCESS, FAILURE, DELAY */

            never = 0;
            other = 0;

            for (q = val; q < val + vlen; q = w + 1) {
                for (w = q; w < val + vlen && *w != ','; w++) {
                    /* void */
                }

                if (w - q == 5 && ngx_smtp_caseless_eq(q, "never", 5)) {
                    never++;

                } else if ((w - q == 7 && ngx_smtp_caseless_eq(q, "success", 7))
                           || (w - q == 7
                               && ngx_smtp_caseless_eq(q, "failure", 7))
                           || (w - q == 5
                               && ngx_smtp_caseless_eq(q, "delay", 5)))
                {
                    other++;

                } else {
                    return NGX_SMTP_E_SYNTAX;
                }

                if (w == val + vlen - 1) {
                    /* a trailing comma */
                    return NGX_SMTP_E_SYNTAX;
                }
            }

            if ((never && (other || never > 1)) || other > 3) {
                return NGX_SMTP_E_SYNTAX;
            }

            seen_notify = 1;
            ngx_smtp_dsn_add(cmd, 0, kw, val + vlen);

        } else if (kwlen == 5 && ngx_smtp_caseless_eq(kw, "orcpt", 5)) {

            if (seen_orcpt) {
                return NGX_SMTP_E_PARAM;
            }

            /* addr-type ";" xtext: the type is an atom */

            q = val;

            while (q < val + vlen
                   && (ngx_smtp_alpha(*q) || ngx_smtp_digit(*q) || *q == '-'))
            {
                q++;
            }

            if (vlen == 0 || q == val || q == val + vlen || *q != ';'
                || q + 1 == val + vlen || vlen > 500
                || !ngx_smtp_xtext_valid(q + 1, val + vlen - (q + 1)))
            {
                return NGX_SMTP_E_SYNTAX;
            }

            seen_orcpt = 1;
            ngx_smtp_dsn_add(cmd, 1, kw, val + vlen);

        } else {
            return NGX_SMTP_E_PARAM;
        }
    }

    return NGX_SMTP_OK;
}


/*
 * xtext (RFC 3461 4): printable ASCII but "+" and "=", and "+" with two
 * upper-case hex digits
 */

static int
ngx_smtp_xtext_valid(u_char *p, size_t len)
{
    size_t  i;

    for (i = 0; i < len; i++) {

        if (p[i] == '+') {
            if (i + 2 >= len
                || !((p[i + 1] >= '0' && p[i + 1] <= '9')
                     || (p[i + 1] >= 'A' && p[i + 1] <= 'F'))
                || !((p[i + 2] >= '0' && p[i + 2] <= '9')
                     || (p[i + 2] >= 'A' && p[i + 2] <= 'F')))
            {
                return 0;
            }

            i += 2;
            continue;
        }

        if (p[i] < '!' || p[i] > '~' || p[i] == '=') {
            return 0;
        }
    }

    return 1;
}


/* a DSN parameter as it came, "KEYWORD=value" */

static void
ngx_smtp_dsn_add(ngx_smtp_cmd_t *cmd, unsigned i, u_char *kw, u_char *end)
{
    cmd->dsn[i].data = kw;
    cmd->dsn[i].len = end - kw;
}


/* "BDAT" SP chunk-size [SP "LAST"] (RFC 3030 2) */

static int
ngx_smtp_parse_bdat(ngx_smtp_cmd_t *cmd)
{
    u_char  *p, *last;
    off_t    n;
    size_t   digits;

    p = cmd->arg.data;
    last = p + cmd->arg.len;
    n = 0;

    for (digits = 0; p < last && ngx_smtp_digit(*p); p++, digits++) {
        if (n > (NGX_SMTP_OFF_T_MAX - (*p - '0')) / 10) {
            return NGX_SMTP_E_SYNTAX;
        }

        n = n * 10 + (*p - '0');
    }

    if (digits == 0) {
        return NGX_SMTP_E_SYNTAX;
    }

    if (p < last) {
        if (*p != ' ') {
            return NGX_SMTP_E_SYNTAX;
        }

        while (p < last && *p == ' ') {
            p++;
        }

        if (last - p != 4 || !ngx_smtp_caseless_eq(p, "last", 4)) {
            return NGX_SMTP_E_SYNTAX;
        }

        cmd->last = 1;
    }

    cmd->chunk = n;

    return NGX_SMTP_OK;
}


/* "AUTH mechanism [initial-response]" (RFC 4954) */

static int
ngx_smtp_parse_auth(ngx_smtp_cmd_t *cmd)
{
    u_char  *p, *last;

    p = cmd->arg.data;
    last = p + cmd->arg.len;

    while (p < last && *p != ' ') {
        if (!ngx_smtp_alpha(*p) && !ngx_smtp_digit(*p)
            && *p != '-' && *p != '_')
        {
            return NGX_SMTP_E_SYNTAX;
        }

        p++;
    }

    if (p == cmd->arg.data) {
        return NGX_SMTP_E_SYNTAX;
    }

    cmd->mech.data = cmd->arg.data;
    cmd->mech.len = p - cmd->arg.data;

    while (p < last && *p == ' ') {
        p++;
    }

    cmd->initial.data = p;
    cmd->initial.len = last - p;

    if (memchr(p, ' ', last - p) != NULL) {
        return NGX_SMTP_E_SYNTAX;
    }

    return NGX_SMTP_OK;
}
