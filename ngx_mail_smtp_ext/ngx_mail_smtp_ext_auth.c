
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * SMTP AUTH (RFC 4954) against Redis: PLAIN, LOGIN and CRAM-MD5, the
 * user:LOGIN hash, and the failed-AUTH counter shared through Redis.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>

#include "ngx_mail_smtp_ext_module.h"
#include "ngx_mail_smtp_ext_redis.h"
#include "ngx_mail_smtp_ext_passwd.h"


#define NGX_SMTP_EXT_AUTH_NONE      0
#define NGX_SMTP_EXT_AUTH_PLAIN     1
#define NGX_SMTP_EXT_AUTH_USER      2   /* LOGIN, username due */
#define NGX_SMTP_EXT_AUTH_PASS      3   /* LOGIN, password due */
#define NGX_SMTP_EXT_AUTH_CRAM      4


static ngx_str_t  ngx_smtp_ext_auth_ok = ngx_string(
    "235 2.7.0 Authentication successful" CRLF);
static ngx_str_t  ngx_smtp_ext_auth_failed = ngx_string(
    "535 5.7.8 Authentication credentials invalid" CRLF);
static ngx_str_t  ngx_smtp_ext_auth_tempfail = ngx_string(
    "454 4.7.0 Temporary authentication failure" CRLF);
static ngx_str_t  ngx_smtp_ext_auth_limit = ngx_string(
    "454 4.7.0 Too many authentication failures, try again later" CRLF);
static ngx_str_t  ngx_smtp_ext_auth_twice = ngx_string(
    "503 5.5.1 Already authenticated" CRLF);
static ngx_str_t  ngx_smtp_ext_auth_in_tx = ngx_string(
    "503 5.5.1 AUTH not permitted during a mail transaction" CRLF);
static ngx_str_t  ngx_smtp_ext_auth_mech = ngx_string(
    "504 5.5.4 Unrecognized authentication type" CRLF);
static ngx_str_t  ngx_smtp_ext_auth_aborted = ngx_string(
    "501 5.7.0 Authentication aborted" CRLF);
static ngx_str_t  ngx_smtp_ext_auth_decode = ngx_string(
    "501 5.5.2 Cannot decode response" CRLF);
static ngx_str_t  ngx_smtp_ext_auth_plain_ask = ngx_string("334 " CRLF);
static ngx_str_t  ngx_smtp_ext_auth_user_ask = ngx_string(
    "334 VXNlcm5hbWU6" CRLF);
static ngx_str_t  ngx_smtp_ext_auth_pass_ask = ngx_string(
    "334 UGFzc3dvcmQ6" CRLF);


static ngx_int_t ngx_mail_smtp_ext_auth_decode(ngx_mail_session_t *s,
    u_char *data, size_t len, ngx_str_t *out);
static ngx_int_t ngx_mail_smtp_ext_auth_plain(ngx_mail_session_t *s,
    u_char *data, size_t len);
static ngx_int_t ngx_mail_smtp_ext_auth_cram_challenge(ngx_mail_session_t *s);
static ngx_int_t ngx_mail_smtp_ext_auth_cram(ngx_mail_session_t *s,
    u_char *data, size_t len);
static ngx_int_t ngx_mail_smtp_ext_auth_lookup(ngx_mail_session_t *s);
static void ngx_mail_smtp_ext_auth_looked_up(void *data,
    redisReply **replies, ngx_uint_t n);
static void ngx_mail_smtp_ext_auth_verified(void *data, ngx_int_t rc);
static void ngx_mail_smtp_ext_auth_result(ngx_mail_session_t *s,
    ngx_int_t rc);
static void ngx_mail_smtp_ext_auth_count_failure(ngx_mail_session_t *s);
static void ngx_mail_smtp_ext_auth_counted(void *data, redisReply **replies,
    ngx_uint_t n);
static void ngx_mail_smtp_ext_auth_forget(ngx_mail_session_t *s);


ngx_int_t
ngx_mail_smtp_ext_auth(ngx_mail_session_t *s, ngx_smtp_cmd_t *cmd)
{
    ngx_str_t                     *reply;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    reply = ngx_mail_smtp_ext_not_ready(s);
    if (reply) {
        return ngx_mail_smtp_ext_reply(s, reply);
    }

    if (s->login.len) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_twice);
    }

    if (ctx->in_tx) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_in_tx);
    }

    ctx->auth_cram = 0;

    if (cmd->mech.len == 5
        && ngx_strncasecmp(cmd->mech.data, (u_char *) "PLAIN", 5) == 0
        && (sscf->auth_methods & NGX_MAIL_SMTP_EXT_AUTH_PLAIN))
    {
        if (cmd->initial.len) {
            return ngx_mail_smtp_ext_auth_plain(s, cmd->initial.data,
                                                cmd->initial.len);
        }

        ctx->auth_state = NGX_SMTP_EXT_AUTH_PLAIN;
        ctx->state = ngx_smtp_ext_auth_line;
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_plain_ask);
    }

    if (cmd->mech.len == 5
        && ngx_strncasecmp(cmd->mech.data, (u_char *) "LOGIN", 5) == 0
        && (sscf->auth_methods & NGX_MAIL_SMTP_EXT_AUTH_LOGIN))
    {
        ctx->state = ngx_smtp_ext_auth_line;

        if (cmd->initial.len) {
            if (ngx_mail_smtp_ext_auth_decode(s, cmd->initial.data,
                                              cmd->initial.len, &s->login)
                != NGX_OK)
            {
                ctx->state = ngx_smtp_ext_cmd;
                return ngx_mail_smtp_ext_reply(s,
                                          &ngx_smtp_ext_auth_decode);
            }

            ctx->auth_state = NGX_SMTP_EXT_AUTH_PASS;
            return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_pass_ask);
        }

        ctx->auth_state = NGX_SMTP_EXT_AUTH_USER;
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_user_ask);
    }

    if (cmd->mech.len == 8
        && ngx_strncasecmp(cmd->mech.data, (u_char *) "CRAM-MD5", 8) == 0
        && (sscf->auth_methods & NGX_MAIL_SMTP_EXT_AUTH_CRAM_MD5)
        && cmd->initial.len == 0)
    {
        return ngx_mail_smtp_ext_auth_cram_challenge(s);
    }

    return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_mech);
}


/* a continuation line of an AUTH exchange */

ngx_int_t
ngx_mail_smtp_ext_auth_line(ngx_mail_session_t *s, u_char *line, size_t len)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    ctx->state = ngx_smtp_ext_cmd;

    if (len == 1 && line[0] == '*') {
        ngx_mail_smtp_ext_auth_forget(s);
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_aborted);
    }

    switch (ctx->auth_state) {

    case NGX_SMTP_EXT_AUTH_PLAIN:
        return ngx_mail_smtp_ext_auth_plain(s, line, len);

    case NGX_SMTP_EXT_AUTH_USER:
        if (ngx_mail_smtp_ext_auth_decode(s, line, len, &s->login) != NGX_OK
            || s->login.len == 0)
        {
            ngx_mail_smtp_ext_auth_forget(s);
            return ngx_mail_smtp_ext_reply(s,
                                          &ngx_smtp_ext_auth_decode);
        }

        ctx->auth_state = NGX_SMTP_EXT_AUTH_PASS;
        ctx->state = ngx_smtp_ext_auth_line;
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_pass_ask);

    case NGX_SMTP_EXT_AUTH_PASS:
        if (ngx_mail_smtp_ext_auth_decode(s, line, len, &s->passwd)
            != NGX_OK)
        {
            ngx_mail_smtp_ext_auth_forget(s);
            return ngx_mail_smtp_ext_reply(s,
                                          &ngx_smtp_ext_auth_decode);
        }

        return ngx_mail_smtp_ext_auth_lookup(s);

    case NGX_SMTP_EXT_AUTH_CRAM:
        return ngx_mail_smtp_ext_auth_cram(s, line, len);

    default:
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_aborted);
    }
}


static ngx_int_t
ngx_mail_smtp_ext_auth_decode(ngx_mail_session_t *s, u_char *data,
    size_t len, ngx_str_t *out)
{
    ngx_str_t  in;

    in.data = data;
    in.len = len;

    if (len == 1 && data[0] == '=') {
        /* RFC 4954 4: an empty initial response */
        out->len = 0;
        out->data = (u_char *) "";
        return NGX_OK;
    }

    out->data = ngx_pnalloc(s->connection->pool,
                            ngx_base64_decoded_length(len));
    if (out->data == NULL) {
        out->len = 0;
        return NGX_ERROR;
    }

    if (ngx_decode_base64(out, &in) != NGX_OK) {
        out->len = 0;
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* PLAIN: authzid NUL authcid NUL passwd; the authzid is ignored */

static ngx_int_t
ngx_mail_smtp_ext_auth_plain(ngx_mail_session_t *s, u_char *data,
    size_t len)
{
    u_char     *p, *last;
    ngx_str_t   plain;

    if (ngx_mail_smtp_ext_auth_decode(s, data, len, &plain) != NGX_OK) {
        ngx_mail_smtp_ext_auth_forget(s);
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_decode);
    }

    p = plain.data;
    last = p + plain.len;

    while (p < last && *p) {
        p++;
    }

    if (p == last) {
        goto invalid;
    }

    s->login.data = ++p;

    while (p < last && *p) {
        p++;
    }

    if (p == last || p == s->login.data) {
        goto invalid;
    }

    s->login.len = p - s->login.data;

    s->passwd.data = ++p;
    s->passwd.len = last - p;

    return ngx_mail_smtp_ext_auth_lookup(s);

invalid:

    ngx_explicit_memzero(plain.data, plain.len);
    ngx_mail_smtp_ext_auth_forget(s);

    return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_decode);
}


static ngx_int_t
ngx_mail_smtp_ext_auth_cram_challenge(ngx_mail_session_t *s)
{
    u_char                    *p;
    ngx_str_t                  salt, reply;
    ngx_connection_t          *c;
    ngx_mail_smtp_ext_ctx_t   *ctx;
    ngx_mail_core_srv_conf_t  *cscf;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);

    if (s->salt.data == NULL) {
        if (ngx_mail_salt(s, c, cscf) != NGX_OK) {
            return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_tempfail);
        }
    }

    /* s->salt ends in CRLF, which the challenge does not include */

    salt.data = s->salt.data;
    salt.len = s->salt.len - 2;

    reply.len = sizeof("334 " CRLF) - 1 + ngx_base64_encoded_length(salt.len);

    p = ngx_pnalloc(c->pool, reply.len);
    if (p == NULL) {
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_tempfail);
    }

    reply.data = p;
    p = ngx_cpymem(p, "334 ", 4);

    {
        ngx_str_t  enc;

        enc.data = p;
        ngx_encode_base64(&enc, &salt);
        p += enc.len;
    }

    *p++ = CR; *p++ = LF;
    reply.len = p - reply.data;

    ctx->auth_state = NGX_SMTP_EXT_AUTH_CRAM;
    ctx->auth_cram = 1;
    ctx->state = ngx_smtp_ext_auth_line;

    return ngx_mail_smtp_ext_reply(s, &reply);
}


/* CRAM-MD5 response: base64 of "user SP hex-digest" */

static ngx_int_t
ngx_mail_smtp_ext_auth_cram(ngx_mail_session_t *s, u_char *data, size_t len)
{
    u_char     *p, *last;
    ngx_str_t   resp;

    if (ngx_mail_smtp_ext_auth_decode(s, data, len, &resp) != NGX_OK) {
        ngx_mail_smtp_ext_auth_forget(s);
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_decode);
    }

    p = resp.data;
    last = p + resp.len;

    while (last > p && *(last - 1) == ' ') {
        last--;
    }

    for (p = last - 1; p > resp.data && *p != ' '; p--) {
        /* void */
    }

    if (p <= resp.data || last - p - 1 != 32) {
        ngx_mail_smtp_ext_auth_forget(s);
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_decode);
    }

    s->login.data = resp.data;
    s->login.len = p - resp.data;
    s->passwd.data = p + 1;
    s->passwd.len = 32;

    return ngx_mail_smtp_ext_auth_lookup(s);
}


/* one round trip: the user's hash and the client's failure counter */

static ngx_int_t
ngx_mail_smtp_ext_auth_lookup(ngx_mail_session_t *s)
{
    ngx_str_t                      user_key, fail_key;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;
    ngx_mail_smtp_ext_redis_cmd_t  cmds[2];
    const char                    *argv[7];
    size_t                         argvlen[7];

    static const char  *hmget = "HMGET", *get = "GET",
                       *f_password = "password", *f_route = "route",
                       *f_disabled = "disabled";

    c = s->connection;
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    if (s->login.len == 0
        || ngx_strlchr(s->login.data, s->login.data + s->login.len, '\0'))
    {
        ngx_mail_smtp_ext_auth_forget(s);
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_failed);
    }

    if (ngx_mail_smtp_ext_redis_key(c->pool, sscf->redis, "user:", &s->login,
                                    0, &user_key)
        != NGX_OK
        || ngx_mail_smtp_ext_redis_key(c->pool, sscf->redis, "authfail:",
                                       &c->addr_text, 0, &fail_key)
           != NGX_OK)
    {
        ngx_mail_smtp_ext_auth_forget(s);
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_tempfail);
    }

    argv[0] = hmget;
    argvlen[0] = 5;
    argv[1] = (const char *) user_key.data;
    argvlen[1] = user_key.len;
    argv[2] = f_password;
    argvlen[2] = 8;
    argv[3] = f_route;
    argvlen[3] = 5;
    argv[4] = f_disabled;
    argvlen[4] = 8;

    argv[5] = get;
    argvlen[5] = 3;
    argv[6] = (const char *) fail_key.data;
    argvlen[6] = fail_key.len;

    cmds[0].argc = 5;
    cmds[0].argv = &argv[0];
    cmds[0].argvlen = &argvlen[0];
    cmds[1].argc = 2;
    cmds[1].argv = &argv[5];
    cmds[1].argvlen = &argvlen[5];

    if (ngx_mail_smtp_ext_redis_query(sscf->redis, c->pool, cmds, 2,
                                      ngx_mail_smtp_ext_auth_looked_up, s)
        != NGX_OK)
    {
        ngx_mail_smtp_ext_auth_forget(s);
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_tempfail);
    }

    ngx_mail_smtp_ext_wait_lookup(s);

    return NGX_AGAIN;
}


static void
ngx_mail_smtp_ext_auth_looked_up(void *data, redisReply **replies,
    ngx_uint_t n)
{
    ngx_mail_session_t *s = data;

    ngx_int_t                      rc;
    ngx_str_t                      stored, salt;
    redisReply                    *user, *fails, *f;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    if (replies == NULL || n != 2
        || replies[0]->type != REDIS_REPLY_ARRAY
        || replies[0]->elements != 3)
    {
        ngx_log_error(NGX_LOG_ERR, c->log, 0,
                      "smtp_ext: Redis lookup for AUTH failed");
        ngx_mail_smtp_ext_auth_result(s, NGX_ERROR);
        return;
    }

    user = replies[0];
    fails = replies[1];

    if (fails->type == REDIS_REPLY_STRING
        && (ngx_uint_t) ngx_atoi((u_char *) fails->str, fails->len)
           >= sscf->auth_fail_limit
        && ngx_atoi((u_char *) fails->str, fails->len) != NGX_ERROR)
    {
        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "smtp_ext: AUTH refused, too many failures");
        ngx_mail_smtp_ext_auth_result(s, NGX_BUSY);
        return;
    }

    f = user->element[2];

    if (f->type == REDIS_REPLY_STRING && f->len == 1 && f->str[0] == '1') {
        ngx_mail_smtp_ext_auth_result(s, NGX_DECLINED);
        return;
    }

    f = user->element[0];

    if (f->type != REDIS_REPLY_STRING || f->len == 0) {
        ngx_mail_smtp_ext_auth_result(s, NGX_DECLINED);
        return;
    }

    /* the reply is freed after this callback: keep what is needed */

    stored.len = f->len;
    stored.data = ngx_pnalloc(c->pool, f->len);
    if (stored.data == NULL) {
        ngx_mail_smtp_ext_auth_result(s, NGX_ERROR);
        return;
    }

    ngx_memcpy(stored.data, f->str, f->len);

    f = user->element[1];

    ctx->user_route.len = 0;

    if (f->type == REDIS_REPLY_STRING && f->len) {
        ctx->user_route.data = ngx_pnalloc(c->pool, f->len);
        if (ctx->user_route.data == NULL) {
            ngx_mail_smtp_ext_auth_result(s, NGX_ERROR);
            return;
        }

        ngx_memcpy(ctx->user_route.data, f->str, f->len);
        ctx->user_route.len = f->len;
    }

    if (ctx->auth_cram) {
        salt.data = s->salt.data;
        salt.len = s->salt.len - 2;

        rc = ngx_mail_smtp_ext_passwd_plain(&stored, &stored);

        if (rc == NGX_OK) {
            rc = ngx_mail_smtp_ext_cram_md5_verify(&stored, &salt,
                                                   &s->passwd);
        } else {
            /* CRAM-MD5 needs the clear password: {PLAIN} only */
            rc = NGX_DECLINED;
        }

        ngx_explicit_memzero(stored.data, stored.len);
        ngx_mail_smtp_ext_auth_result(s, rc);
        return;
    }

    if (ngx_mail_smtp_ext_passwd_slow(&stored)) {
        rc = ngx_mail_smtp_ext_passwd_verify_async(sscf->thread_pool,
                                     c->pool, &stored, &s->passwd,
                                     ngx_mail_smtp_ext_auth_verified, s);
        if (rc == NGX_OK)
        {
            return;
        }

        ngx_mail_smtp_ext_auth_result(s, NGX_ERROR);
        return;
    }

    rc = ngx_mail_smtp_ext_passwd_verify(&stored, &s->passwd);

    ngx_explicit_memzero(stored.data, stored.len);

    if (rc == NGX_ERROR) {
        ngx_log_error(NGX_LOG_ERR, c->log, 0,
                      "smtp_ext: unsupported password scheme for user "
                      "\"%V\"", &s->login);
    }

    ngx_mail_smtp_ext_auth_result(s, rc);
}


static void
ngx_mail_smtp_ext_auth_verified(void *data, ngx_int_t rc)
{
    ngx_mail_smtp_ext_auth_result(data, rc);
}


/*
 * NGX_OK: authenticated; NGX_DECLINED: wrong credentials (counted);
 * NGX_BUSY: over the failure limit; otherwise a temporary failure.
 */

static void
ngx_mail_smtp_ext_auth_result(ngx_mail_session_t *s, ngx_int_t rc)
{
    u_char                   *p;
    ngx_connection_t         *c;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (s->passwd.len) {
        ngx_explicit_memzero(s->passwd.data, s->passwd.len);
    }

    s->passwd.len = 0;

    switch (rc) {

    case NGX_OK:
        /* s->login points into a decoded buffer: keep a copy of its own */

        p = ngx_pnalloc(c->pool, s->login.len);
        if (p == NULL) {
            ngx_mail_smtp_ext_auth_forget(s);
            ngx_mail_smtp_ext_lookup_done(s, &ngx_smtp_ext_auth_tempfail);
            return;
        }

        ngx_memcpy(p, s->login.data, s->login.len);
        s->login.data = p;

        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "smtp_ext: authenticated as \"%V\"", &s->login);

        /* the backend knows the client without LOGIN= so far */
        ngx_mail_smtp_ext_relay_close(s, 1);

        ngx_mail_smtp_ext_lookup_done(s, &ngx_smtp_ext_auth_ok);
        return;

    case NGX_DECLINED:
        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "smtp_ext: authentication failed for \"%V\"",
                      &s->login);

        ngx_mail_smtp_ext_auth_count_failure(s);
        ngx_mail_smtp_ext_auth_forget(s);
        ngx_mail_smtp_ext_lookup_done(s, &ngx_smtp_ext_auth_failed);
        return;

    case NGX_BUSY:
        ngx_mail_smtp_ext_auth_forget(s);
        ngx_mail_smtp_ext_lookup_done(s, &ngx_smtp_ext_auth_limit);
        return;

    default:
        ngx_mail_smtp_ext_auth_forget(s);
        ngx_mail_smtp_ext_lookup_done(s, &ngx_smtp_ext_auth_tempfail);
        return;
    }

    (void) ctx;
}


/* the counter gets its TTL when it is created: a fixed window */

static void
ngx_mail_smtp_ext_auth_count_failure(ngx_mail_session_t *s)
{
    size_t                          len;
    ngx_str_t                       key;
    ngx_connection_t               *c;
    ngx_mail_smtp_ext_srv_conf_t   *sscf;
    ngx_mail_smtp_ext_redis_cmd_t   cmds[2];
    const char                     *argv[8];
    size_t                          argvlen[8];
    u_char                          window[NGX_TIME_T_LEN];

    static const char  *set = "SET", *zero = "0", *ex = "EX", *nx = "NX",
                       *incr = "INCR";

    c = s->connection;
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    if (ngx_mail_smtp_ext_redis_key(c->pool, sscf->redis, "authfail:",
                                    &c->addr_text, 0, &key)
        != NGX_OK)
    {
        return;
    }

    len = ngx_sprintf(window, "%T", sscf->auth_fail_window)
          - window;

    argv[0] = set;
    argvlen[0] = 3;
    argv[1] = (const char *) key.data;
    argvlen[1] = key.len;
    argv[2] = zero;
    argvlen[2] = 1;
    argv[3] = ex;
    argvlen[3] = 2;
    argv[4] = (const char *) window;
    argvlen[4] = len;
    argv[5] = nx;
    argvlen[5] = 2;

    argv[6] = incr;
    argvlen[6] = 4;
    argv[7] = (const char *) key.data;
    argvlen[7] = key.len;

    cmds[0].argc = 6;
    cmds[0].argv = &argv[0];
    cmds[0].argvlen = &argvlen[0];
    cmds[1].argc = 2;
    cmds[1].argv = &argv[6];
    cmds[1].argvlen = &argvlen[6];

    (void) ngx_mail_smtp_ext_redis_query(sscf->redis, c->pool, cmds, 2,
                                         ngx_mail_smtp_ext_auth_counted, s);
}


static void
ngx_mail_smtp_ext_auth_counted(void *data, redisReply **replies,
    ngx_uint_t n)
{
    ngx_mail_session_t  *s = data;

    if (replies == NULL) {
        ngx_log_error(NGX_LOG_WARN, s->connection->log, 0,
                      "smtp_ext: failed AUTH not counted in Redis");
    }
}


static void
ngx_mail_smtp_ext_auth_forget(ngx_mail_session_t *s)
{
    if (s->passwd.len) {
        ngx_explicit_memzero(s->passwd.data, s->passwd.len);
    }

    s->login.len = 0;
    s->login.data = NULL;
    s->passwd.len = 0;
    s->passwd.data = NULL;
}


/* forgets any authentication and any exchange under way */

void
ngx_mail_smtp_ext_auth_reset(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    ngx_mail_smtp_ext_auth_forget(s);

    ctx->auth_state = NGX_SMTP_EXT_AUTH_NONE;
    ctx->user_route.len = 0;
}
