
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * SMTP AUTH (RFC 4954) against Redis: PLAIN, LOGIN and CRAM-MD5, the
 * user:LOGIN hash, and the failed-AUTH counter shared through Redis.
 *
 * With smtp_ext_redis_cache the user:LOGIN fields are cached (SPEC 11):
 * a fresh entry saves the HMGET, but the authfail: counter, never cached,
 * is still asked every time.  When Redis fails or times out, an entry
 * still within "stale" answers and the counter cannot be checked; with
 * no entry the AUTH gets the usual 454.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>

#include "ngx_mail_smtp_ext_module.h"
#include "ngx_mail_smtp_ext_redis.h"
#include "ngx_mail_smtp_ext_passwd.h"
#include "ngx_mail_smtp_ext_cache.h"
#include "ngx_mail_smtp_ext_metrics.h"


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


static ngx_int_t ngx_mail_smtp_ext_auth_start(ngx_mail_session_t *s);
static void ngx_mail_smtp_ext_auth_end(ngx_mail_session_t *s);
static ngx_int_t ngx_mail_smtp_ext_auth_fail(ngx_mail_session_t *s,
    ngx_str_t *reply);
static ngx_int_t ngx_mail_smtp_ext_auth_decode(ngx_mail_session_t *s,
    u_char *data, size_t len, ngx_str_t *out);
static ngx_int_t ngx_mail_smtp_ext_auth_plain(ngx_mail_session_t *s,
    u_char *data, size_t len);
static ngx_int_t ngx_mail_smtp_ext_auth_login(ngx_mail_session_t *s,
    ngx_int_t step, u_char *data, size_t len);
static ngx_int_t ngx_mail_smtp_ext_auth_cram_challenge(ngx_mail_session_t *s);
static ngx_int_t ngx_mail_smtp_ext_auth_cram(ngx_mail_session_t *s,
    u_char *data, size_t len);
static ngx_int_t ngx_mail_smtp_ext_auth_lookup(ngx_mail_session_t *s);
static void ngx_mail_smtp_ext_auth_looked_up(void *data,
    redisReply **replies, ngx_uint_t n);
static ngx_int_t ngx_mail_smtp_ext_auth_user(ngx_mail_session_t *s,
    redisReply *user);
static ngx_int_t ngx_mail_smtp_ext_auth_from_cache(ngx_mail_session_t *s,
    ngx_uint_t stale_ok);
static ngx_int_t ngx_mail_smtp_ext_auth_keep(ngx_mail_smtp_ext_ctx_t *ctx,
    ngx_str_t *dst, u_char *src, size_t len);
static void ngx_mail_smtp_ext_auth_check(ngx_mail_session_t *s);
static void ngx_mail_smtp_ext_auth_verified(void *data, ngx_int_t rc);
static void ngx_mail_smtp_ext_auth_result(ngx_mail_session_t *s,
    ngx_int_t rc);
static void ngx_mail_smtp_ext_auth_count_failure(ngx_mail_session_t *s);
static void ngx_mail_smtp_ext_auth_counted(void *data, redisReply **replies,
    ngx_uint_t n);
static void ngx_mail_smtp_ext_lookup_cleanup(void *data);


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

    if (cmd->mech.len == 5
        && ngx_strncasecmp(cmd->mech.data, (u_char *) "PLAIN", 5) == 0
        && (sscf->auth_methods & NGX_MAIL_SMTP_EXT_AUTH_PLAIN))
    {
        if (ngx_mail_smtp_ext_auth_start(s) != NGX_OK) {
            return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_tempfail);
        }

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
        if (ngx_mail_smtp_ext_auth_start(s) != NGX_OK) {
            return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_tempfail);
        }

        if (cmd->initial.len) {
            return ngx_mail_smtp_ext_auth_login(s, NGX_SMTP_AUTH_LOGIN_USER,
                                                cmd->initial.data,
                                                cmd->initial.len);
        }

        ctx->auth_state = NGX_SMTP_EXT_AUTH_USER;
        ctx->state = ngx_smtp_ext_auth_line;
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_user_ask);
    }

    if (cmd->mech.len == 8
        && ngx_strncasecmp(cmd->mech.data, (u_char *) "CRAM-MD5", 8) == 0
        && (sscf->auth_methods & NGX_MAIL_SMTP_EXT_AUTH_CRAM_MD5)
        && cmd->initial.len == 0)
    {
        if (ngx_mail_smtp_ext_auth_start(s) != NGX_OK) {
            return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_tempfail);
        }

        return ngx_mail_smtp_ext_auth_cram_challenge(s);
    }

    return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_mech);
}


/* a continuation line of an AUTH exchange */

ngx_int_t
ngx_mail_smtp_ext_auth_line(ngx_mail_session_t *s, u_char *line, size_t len)
{
    size_t                    n;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    ctx->state = ngx_smtp_ext_cmd;

    if (ctx->auth_pool == NULL) {
        /* the exchange was reset under us */
        return ngx_mail_smtp_ext_auth_fail(s, &ngx_smtp_ext_auth_aborted);
    }

    if (ngx_smtp_sasl_response(line, len, &n) == NGX_SMTP_AUTH_CANCEL) {
        return ngx_mail_smtp_ext_auth_fail(s, &ngx_smtp_ext_auth_aborted);
    }

    switch (ctx->auth_state) {

    case NGX_SMTP_EXT_AUTH_PLAIN:
        return ngx_mail_smtp_ext_auth_plain(s, line, len);

    case NGX_SMTP_EXT_AUTH_USER:
        return ngx_mail_smtp_ext_auth_login(s, NGX_SMTP_AUTH_LOGIN_USER,
                                            line, len);

    case NGX_SMTP_EXT_AUTH_PASS:
        return ngx_mail_smtp_ext_auth_login(s, NGX_SMTP_AUTH_LOGIN_PASS,
                                            line, len);

    case NGX_SMTP_EXT_AUTH_CRAM:
        return ngx_mail_smtp_ext_auth_cram(s, line, len);

    default:
        return ngx_mail_smtp_ext_auth_fail(s, &ngx_smtp_ext_auth_aborted);
    }
}


void
ngx_mail_smtp_ext_auth_reset(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    ngx_mail_smtp_ext_auth_end(s);

    if (ctx->state == ngx_smtp_ext_auth_line) {
        ctx->state = ngx_smtp_ext_cmd;
    }

    if (s->login.len) {
        /* the backend knows the client with its LOGIN= */
        ngx_mail_smtp_ext_relay_close(s, 1);
    }

    ngx_str_null(&s->login);
    ngx_str_null(&s->passwd);
    ngx_str_null(&ctx->user_route);
}


/*
 * Every exchange has a pool of its own: decoded responses, keys, the
 * Redis query and the password check live and die with it.
 */

static ngx_int_t
ngx_mail_smtp_ext_auth_start(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    /* what an abandoned exchange (an overlong line) left */
    ngx_mail_smtp_ext_auth_end(s);

    if (ngx_mail_smtp_ext_lookup_cleanup_add(s) != NGX_OK) {
        return NGX_ERROR;
    }

    ctx->auth_pool = ngx_create_pool(1024, s->connection->log);
    if (ctx->auth_pool == NULL) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* ends an exchange: any pending query or check is cancelled with it */

static void
ngx_mail_smtp_ext_auth_end(ngx_mail_session_t *s)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (ctx->auth_passwd.len) {
        ngx_explicit_memzero(ctx->auth_passwd.data, ctx->auth_passwd.len);
    }

    ngx_str_null(&ctx->auth_user);
    ngx_str_null(&ctx->auth_passwd);
    ngx_str_null(&ctx->auth_route);
    ngx_str_null(&ctx->auth_key);
    ngx_str_null(&ctx->auth_stored);

    ctx->auth_state = NGX_SMTP_EXT_AUTH_NONE;
    ctx->auth_cram = 0;
    ctx->auth_cached = 0;
    ctx->auth_disabled = 0;

    if (ctx->auth_pool) {
        ngx_destroy_pool(ctx->auth_pool);
        ctx->auth_pool = NULL;
    }
}


static ngx_int_t
ngx_mail_smtp_ext_auth_fail(ngx_mail_session_t *s, ngx_str_t *reply)
{
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    ngx_mail_smtp_ext_auth_end(s);
    ctx->state = ngx_smtp_ext_cmd;

    return ngx_mail_smtp_ext_reply(s, reply);
}


/* NGX_OK, or NGX_ERROR for anything that is not base64 */

static ngx_int_t
ngx_mail_smtp_ext_auth_decode(ngx_mail_session_t *s, u_char *data,
    size_t len, ngx_str_t *out)
{
    size_t                    n;
    ngx_str_t                 in;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    switch (ngx_smtp_sasl_response(data, len, &n)) {

    case NGX_SMTP_AUTH_EMPTY:
        /* RFC 4954 4: "=" is an empty initial response */
        out->len = 0;
        out->data = (u_char *) "";
        return NGX_OK;

    case NGX_SMTP_AUTH_DATA:
        break;

    default:
        return NGX_ERROR;
    }

    out->data = ngx_pnalloc(ctx->auth_pool, n);
    if (out->data == NULL) {
        return NGX_ERROR;
    }

    in.data = data;
    in.len = len;

    if (ngx_decode_base64(out, &in) != NGX_OK || out->len != n) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* PLAIN: authzid NUL authcid NUL passwd; the authzid is ignored */

static ngx_int_t
ngx_mail_smtp_ext_auth_plain(ngx_mail_session_t *s, u_char *data,
    size_t len)
{
    ngx_str_t                 plain;
    ngx_smtp_str_t            authzid, user, passwd;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (ngx_mail_smtp_ext_auth_decode(s, data, len, &plain) != NGX_OK
        || ngx_smtp_sasl_plain(plain.data, plain.len, &authzid, &user,
                               &passwd)
           != NGX_SMTP_OK)
    {
        return ngx_mail_smtp_ext_auth_fail(s, &ngx_smtp_ext_auth_decode);
    }

    ctx->auth_user = *(ngx_str_t *) &user;
    ctx->auth_passwd = *(ngx_str_t *) &passwd;

    return ngx_mail_smtp_ext_auth_lookup(s);
}


/* LOGIN: the user name, then the password, each in its own line */

static ngx_int_t
ngx_mail_smtp_ext_auth_login(ngx_mail_session_t *s, ngx_int_t step,
    u_char *data, size_t len)
{
    ngx_str_t                 decoded;
    ngx_smtp_str_t            value;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (ngx_mail_smtp_ext_auth_decode(s, data, len, &decoded) != NGX_OK
        || ngx_smtp_sasl_login(step, decoded.data, decoded.len, &value)
           != NGX_SMTP_OK)
    {
        return ngx_mail_smtp_ext_auth_fail(s, &ngx_smtp_ext_auth_decode);
    }

    if (step == NGX_SMTP_AUTH_LOGIN_USER) {
        /* a candidate only: s->login waits for the verified password */
        ctx->auth_user = *(ngx_str_t *) &value;
        ctx->auth_state = NGX_SMTP_EXT_AUTH_PASS;
        ctx->state = ngx_smtp_ext_auth_line;
        return ngx_mail_smtp_ext_reply(s, &ngx_smtp_ext_auth_pass_ask);
    }

    ctx->auth_passwd = *(ngx_str_t *) &value;

    return ngx_mail_smtp_ext_auth_lookup(s);
}


static ngx_int_t
ngx_mail_smtp_ext_auth_cram_challenge(ngx_mail_session_t *s)
{
    u_char                    *p;
    ngx_str_t                  salt, reply, enc;
    ngx_connection_t          *c;
    ngx_mail_smtp_ext_ctx_t   *ctx;
    ngx_mail_core_srv_conf_t  *cscf;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    cscf = ngx_mail_get_module_srv_conf(s, ngx_mail_core_module);

    /* one salt per session, in c->pool */

    if (s->salt.data == NULL) {
        if (ngx_mail_salt(s, c, cscf) != NGX_OK) {
            return ngx_mail_smtp_ext_auth_fail(s,
                                               &ngx_smtp_ext_auth_tempfail);
        }
    }

    /* s->salt ends in CRLF, which the challenge does not include */

    salt.data = s->salt.data;
    salt.len = s->salt.len - 2;

    reply.len = sizeof("334 " CRLF) - 1 + ngx_base64_encoded_length(salt.len);

    p = ngx_pnalloc(ctx->auth_pool, reply.len);
    if (p == NULL) {
        return ngx_mail_smtp_ext_auth_fail(s, &ngx_smtp_ext_auth_tempfail);
    }

    reply.data = p;
    p = ngx_cpymem(p, "334 ", 4);

    enc.data = p;
    ngx_encode_base64(&enc, &salt);
    p += enc.len;

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
    ngx_str_t                 resp;
    ngx_smtp_str_t            user, digest;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (ngx_mail_smtp_ext_auth_decode(s, data, len, &resp) != NGX_OK
        || ngx_smtp_sasl_cram(resp.data, resp.len, &user, &digest)
           != NGX_SMTP_OK)
    {
        return ngx_mail_smtp_ext_auth_fail(s, &ngx_smtp_ext_auth_decode);
    }

    ctx->auth_user = *(ngx_str_t *) &user;
    ctx->auth_passwd = *(ngx_str_t *) &digest;

    return ngx_mail_smtp_ext_auth_lookup(s);
}


/*
 * One round trip: the user's hash and the client's failure counter, or
 * the counter alone when the cache has the user.
 */

static ngx_int_t
ngx_mail_smtp_ext_auth_lookup(ngx_mail_session_t *s)
{
    ngx_str_t                      user_key, fail_key;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;
    ngx_mail_smtp_ext_redis_cmd_t  cmds[2];
    const char                    *argv[7];
    size_t                         argvlen[7];

    static const char  *hmget = "HMGET", *get = "GET",
                       *f_password = "password", *f_route = "route",
                       *f_disabled = "disabled";

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    ctx->state = ngx_smtp_ext_cmd;

    if (!ngx_smtp_sasl_user_valid(ctx->auth_user.data, ctx->auth_user.len)) {
        return ngx_mail_smtp_ext_auth_fail(s, &ngx_smtp_ext_auth_failed);
    }

    if (ngx_mail_smtp_ext_redis_key(ctx->auth_pool, sscf->redis, "user:",
                                    &ctx->auth_user, 0, &user_key)
        != NGX_OK
        || ngx_mail_smtp_ext_redis_key(ctx->auth_pool, sscf->redis,
                                       "authfail:", &c->addr_text, 0,
                                       &fail_key)
           != NGX_OK)
    {
        return ngx_mail_smtp_ext_auth_fail(s, &ngx_smtp_ext_auth_tempfail);
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

    ctx->auth_key = user_key;

    if (ngx_mail_smtp_ext_cache_enabled(s)) {
        if (ngx_mail_smtp_ext_auth_from_cache(s, 0) == NGX_OK) {
            ctx->auth_cached = 1;
            ngx_mail_smtp_ext_metric_cache(NGX_SMTP_EXT_M_CACHE_HIT);

        } else {
            ngx_mail_smtp_ext_metric_cache(NGX_SMTP_EXT_M_CACHE_MISS);
        }
    }

    /* tied to the exchange's pool: ending the exchange cancels it */

    if (ngx_mail_smtp_ext_redis_query(sscf->redis, ctx->auth_pool,
                                      ctx->auth_cached ? &cmds[1] : cmds,
                                      ctx->auth_cached ? 1 : 2,
                                      ngx_mail_smtp_ext_auth_looked_up, s)
        != NGX_OK)
    {
        return ngx_mail_smtp_ext_auth_fail(s, &ngx_smtp_ext_auth_tempfail);
    }

    ngx_mail_smtp_ext_wait_lookup(s);

    return NGX_AGAIN;
}


static void
ngx_mail_smtp_ext_auth_looked_up(void *data, redisReply **replies,
    ngx_uint_t n)
{
    ngx_mail_session_t *s = data;

    ngx_int_t                      fails;
    ngx_uint_t                     i;
    redisReply                    *user, *f;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    for (i = 0; replies && i < n; i++) {
        if (replies[i]->type == REDIS_REPLY_ERROR) {
            /* -LOADING and the like: Redis failed, it did not lie */
            ngx_log_error(NGX_LOG_ERR, c->log, 0,
                          "smtp_ext: Redis answered AUTH with an error: "
                          "%*s", (size_t) replies[i]->len, replies[i]->str);
            replies = NULL;
        }
    }

    if (replies == NULL) {
        /* Redis failed or timed out: a cached user, fresh or stale */

        if (ctx->auth_cached
            || (ngx_mail_smtp_ext_cache_enabled(s)
                && ngx_mail_smtp_ext_auth_from_cache(s, 1) == NGX_OK))
        {
            ngx_log_error(NGX_LOG_WARN, c->log, 0,
                          "smtp_ext: Redis failed, user \"%V\" checked "
                          "from the cache without the failure counter",
                          &ctx->auth_user);

            if (!ctx->auth_cached) {
                ngx_mail_smtp_ext_metric_cache(NGX_SMTP_EXT_M_CACHE_STALE);
            }

            ngx_mail_smtp_ext_auth_check(s);
            return;
        }

        ngx_log_error(NGX_LOG_ERR, c->log, 0,
                      "smtp_ext: Redis lookup for AUTH failed");
        ngx_mail_smtp_ext_auth_result(s, NGX_ERROR);
        return;
    }

    user = NULL;

    if (ctx->auth_cached) {
        f = (n == 1) ? replies[0] : NULL;

    } else {
        f = (n == 2) ? replies[1] : NULL;
        user = (n == 2) ? replies[0] : NULL;

        if (user
            && (user->type != REDIS_REPLY_ARRAY || user->elements != 3))
        {
            user = NULL;
        }
    }

    /*
     * Anything but a string or nothing is a broken or hostile Redis: a
     * temporary failure, never a wrong password (535) nor a lifted
     * failure limit.
     */

    if (f == NULL
        || (f->type != REDIS_REPLY_STRING && f->type != REDIS_REPLY_NIL)
        || (!ctx->auth_cached
            && (user == NULL
                || (user->element[0]->type != REDIS_REPLY_STRING
                    && user->element[0]->type != REDIS_REPLY_NIL)
                || (user->element[1]->type != REDIS_REPLY_STRING
                    && user->element[1]->type != REDIS_REPLY_NIL)
                || (user->element[2]->type != REDIS_REPLY_STRING
                    && user->element[2]->type != REDIS_REPLY_NIL))))
    {
        ngx_log_error(NGX_LOG_ERR, c->log, 0,
                      "smtp_ext: Redis answered AUTH with a wrong type");
        ngx_mail_smtp_ext_auth_result(s, NGX_ERROR);
        return;
    }

    if (f->type == REDIS_REPLY_STRING) {
        fails = ngx_atoi((u_char *) f->str, f->len);

        if (fails != NGX_ERROR && (ngx_uint_t) fails >= sscf->auth_fail_limit)
        {
            ngx_log_error(NGX_LOG_INFO, c->log, 0,
                          "smtp_ext: AUTH refused, too many failures");
            ngx_mail_smtp_ext_auth_result(s, NGX_BUSY);
            return;
        }
    }

    if (!ctx->auth_cached
        && ngx_mail_smtp_ext_auth_user(s, user) != NGX_OK)
    {
        ngx_mail_smtp_ext_auth_result(s, NGX_ERROR);
        return;
    }

    ngx_mail_smtp_ext_auth_check(s);
}


/*
 * The fields of user:LOGIN that Redis sent, copied into the exchange's
 * pool (the reply is freed after the callback) and into the cache as
 * "D" "L" password route: D is '1' for disabled, L the password's length.
 */

static ngx_int_t
ngx_mail_smtp_ext_auth_user(ngx_mail_session_t *s, redisReply *user)
{
    u_char                   *p;
    ngx_str_t                 val;
    redisReply               *pw, *route, *disabled;
    ngx_mail_smtp_ext_ctx_t  *ctx;
    u_char                    buf[NGX_MAIL_SMTP_EXT_CACHE_VALUE_MAX];

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    pw = user->element[0];
    route = user->element[1];
    disabled = user->element[2];

    /* nothing of a cache read that failed halfway may stay */
    ngx_str_null(&ctx->auth_stored);
    ngx_str_null(&ctx->auth_route);

    ctx->auth_disabled = (disabled->type == REDIS_REPLY_STRING
                          && disabled->len == 1 && disabled->str[0] == '1');

    if (pw->type == REDIS_REPLY_STRING && pw->len
        && ngx_mail_smtp_ext_auth_keep(ctx, &ctx->auth_stored,
                                       (u_char *) pw->str, pw->len)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (route->type == REDIS_REPLY_STRING && route->len
        && ngx_mail_smtp_ext_auth_keep(ctx, &ctx->auth_route,
                                       (u_char *) route->str, route->len)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (!ngx_mail_smtp_ext_cache_enabled(s)
        || 2 + ctx->auth_stored.len + ctx->auth_route.len > sizeof(buf))
    {
        /* too long to cache: asked every time */
        return NGX_OK;
    }

    p = buf;
    *p++ = ctx->auth_disabled ? '1' : '0';
    *p++ = (u_char) ctx->auth_stored.len;
    p = ngx_cpymem(p, ctx->auth_stored.data, ctx->auth_stored.len);
    p = ngx_cpymem(p, ctx->auth_route.data, ctx->auth_route.len);

    val.data = buf;
    val.len = p - buf;

    ngx_mail_smtp_ext_cache_put(s, &ctx->auth_key, &val);

    ngx_explicit_memzero(buf, val.len);

    return NGX_OK;
}


/* NGX_OK: the user's fields from the cache are in ctx */

static ngx_int_t
ngx_mail_smtp_ext_auth_from_cache(ngx_mail_session_t *s,
    ngx_uint_t stale_ok)
{
    size_t                    plen;
    ngx_int_t                 rc;
    ngx_str_t                 val;
    ngx_mail_smtp_ext_ctx_t  *ctx;
    u_char                    buf[NGX_MAIL_SMTP_EXT_CACHE_VALUE_MAX];

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    rc = ngx_mail_smtp_ext_cache_get(s, &ctx->auth_key, buf, &val,
                                     stale_ok);

    if (rc != NGX_OK && rc != NGX_DONE) {
        return NGX_DECLINED;
    }

    if (val.data == NULL || val.len < 2
        || (val.data[0] != '0' && val.data[0] != '1')
        || (size_t) val.data[1] > val.len - 2)
    {
        /* not a user entry */
        ngx_explicit_memzero(buf, sizeof(buf));
        return NGX_DECLINED;
    }

    plen = val.data[1];

    ctx->auth_disabled = (val.data[0] == '1');
    ngx_str_null(&ctx->auth_stored);
    ngx_str_null(&ctx->auth_route);

    rc = NGX_OK;

    if (plen) {
        rc = ngx_mail_smtp_ext_auth_keep(ctx, &ctx->auth_stored,
                                         val.data + 2, plen);
    }

    if (rc == NGX_OK && val.len - 2 - plen) {
        rc = ngx_mail_smtp_ext_auth_keep(ctx, &ctx->auth_route,
                                         val.data + 2 + plen,
                                         val.len - 2 - plen);
    }

    ngx_explicit_memzero(buf, sizeof(buf));

    return rc;
}


/* a copy in the exchange's pool: the reply or the cache's copy goes */

static ngx_int_t
ngx_mail_smtp_ext_auth_keep(ngx_mail_smtp_ext_ctx_t *ctx, ngx_str_t *dst,
    u_char *src, size_t len)
{
    dst->data = ngx_pnalloc(ctx->auth_pool, len);
    if (dst->data == NULL) {
        dst->len = 0;
        return NGX_ERROR;
    }

    ngx_memcpy(dst->data, src, len);
    dst->len = len;

    return NGX_OK;
}


/* the password against the user's fields in ctx */

static void
ngx_mail_smtp_ext_auth_check(ngx_mail_session_t *s)
{
    ngx_int_t                      rc;
    ngx_str_t                      stored, salt;
    ngx_smtp_str_t                 rest;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_ctx_t       *ctx;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    if (ctx->auth_disabled || ctx->auth_stored.len == 0) {
        ngx_mail_smtp_ext_auth_result(s, NGX_DECLINED);
        return;
    }

    /* auth_route becomes the session's only with a verified password */

    stored = ctx->auth_stored;

    switch (ngx_smtp_passwd_scheme(stored.data, stored.len, &rest)) {

    case NGX_SMTP_PW_CRYPT:
        if (ctx->auth_cram) {
            rc = NGX_DECLINED;
            break;
        }

        rc = ngx_mail_smtp_ext_passwd_verify_async(sscf->thread_pool,
                                     ctx->auth_pool, &stored,
                                     &ctx->auth_passwd,
                                     ngx_mail_smtp_ext_auth_verified, s);
        if (rc == NGX_OK) {
            /* the exchange's pool detaches a check still running */
            return;
        }

        rc = NGX_ERROR;
        break;

    case NGX_SMTP_PW_PLAIN:
        if (ctx->auth_cram) {
            salt.data = s->salt.data;
            salt.len = s->salt.len - 2;

            rc = ngx_mail_smtp_ext_cram_md5_verify((ngx_str_t *) &rest,
                                                   &salt, &ctx->auth_passwd);
            break;
        }

        rc = ngx_mail_smtp_ext_passwd_verify(&stored, &ctx->auth_passwd);
        break;

    case NGX_SMTP_PW_INVALID:
    case NGX_SMTP_PW_UNKNOWN:
        ngx_log_error(NGX_LOG_ERR, c->log, 0,
                      "smtp_ext: unsupported password scheme for user "
                      "\"%V\"", &ctx->auth_user);
        rc = NGX_ERROR;
        break;

    default:
        /* CRAM-MD5 needs the clear password: {PLAIN} only */
        rc = ctx->auth_cram
             ? NGX_DECLINED
             : ngx_mail_smtp_ext_passwd_verify(&stored, &ctx->auth_passwd);

        if (rc == NGX_ERROR) {
            ngx_log_error(NGX_LOG_ERR, c->log, 0,
                          "smtp_ext: bad password hash for user \"%V\"",
                          &ctx->auth_user);
        }

        break;
    }

    ngx_explicit_memzero(stored.data, stored.len);

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
 * Every outcome ends the exchange before the session goes on.
 */

static void
ngx_mail_smtp_ext_auth_result(ngx_mail_session_t *s, ngx_int_t rc)
{
    u_char                   *p;
    ngx_str_t                *reply;
    ngx_connection_t         *c;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    c = s->connection;
    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (ctx->auth_passwd.len) {
        ngx_explicit_memzero(ctx->auth_passwd.data, ctx->auth_passwd.len);
        ctx->auth_passwd.len = 0;
    }

    switch (rc) {

    case NGX_OK:
        /* the login and its route outlive the exchange: c->pool */

        p = ngx_pnalloc(c->pool, ctx->auth_user.len + ctx->auth_route.len);
        if (p == NULL) {
            reply = &ngx_smtp_ext_auth_tempfail;
            break;
        }

        s->login.data = p;
        s->login.len = ctx->auth_user.len;
        p = ngx_cpymem(p, ctx->auth_user.data, ctx->auth_user.len);

        ctx->user_route.data = p;
        ctx->user_route.len = ctx->auth_route.len;
        ngx_memcpy(p, ctx->auth_route.data, ctx->auth_route.len);

        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "smtp_ext: authenticated as \"%V\"", &s->login);

        /* the backend knows the client without LOGIN= so far */
        ngx_mail_smtp_ext_relay_close(s, 1);

        reply = &ngx_smtp_ext_auth_ok;
        break;

    case NGX_DECLINED:
        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "smtp_ext: authentication failed for \"%V\"",
                      &ctx->auth_user);

        ngx_mail_smtp_ext_auth_count_failure(s);
        reply = &ngx_smtp_ext_auth_failed;
        break;

    case NGX_BUSY:
        reply = &ngx_smtp_ext_auth_limit;
        break;

    default:
        reply = &ngx_smtp_ext_auth_tempfail;
        break;
    }

    ngx_mail_smtp_ext_metric_auth(s, reply == &ngx_smtp_ext_auth_ok ? NGX_OK
                                     : reply == &ngx_smtp_ext_auth_failed
                                       ? NGX_DECLINED : NGX_ERROR);
    ngx_mail_smtp_ext_auth_end(s);
    ngx_mail_smtp_ext_lookup_done(s, reply);
}


/*
 * The counter gets its TTL when it is created: a fixed window.  Fire and
 * forget: the query has a small pool of its own, freed by its handler,
 * which never looks at the session (it may be gone by then).
 */

static void
ngx_mail_smtp_ext_auth_count_failure(ngx_mail_session_t *s)
{
    size_t                          len;
    ngx_str_t                       key;
    ngx_pool_t                     *pool;
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

    pool = ngx_create_pool(512, ngx_cycle->log);
    if (pool == NULL) {
        return;
    }

    if (ngx_mail_smtp_ext_redis_key(pool, sscf->redis, "authfail:",
                                    &c->addr_text, 0, &key)
        != NGX_OK)
    {
        ngx_destroy_pool(pool);
        return;
    }

    len = ngx_sprintf(window, "%T", sscf->auth_fail_window) - window;

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

    if (ngx_mail_smtp_ext_redis_query(sscf->redis, pool, cmds, 2,
                                      ngx_mail_smtp_ext_auth_counted, pool)
        != NGX_OK)
    {
        ngx_destroy_pool(pool);
    }
}


static void
ngx_mail_smtp_ext_auth_counted(void *data, redisReply **replies,
    ngx_uint_t n)
{
    ngx_pool_t  *pool = data;

    if (replies == NULL) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "smtp_ext: failed AUTH not counted in Redis");
    }

    /* the query is finished: its cleanup entry is inert */
    ngx_destroy_pool(pool);
}


/*
 * One c->pool cleanup per session, added on first use, takes the AUTH
 * exchange, the RCPT lookup and the held routes with the session.
 */

ngx_int_t
ngx_mail_smtp_ext_lookup_cleanup_add(ngx_mail_session_t *s)
{
    ngx_pool_cleanup_t       *cln;
    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    if (ctx->lookup_cleanup) {
        return NGX_OK;
    }

    cln = ngx_pool_cleanup_add(s->connection->pool, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    cln->handler = ngx_mail_smtp_ext_lookup_cleanup;
    cln->data = s;

    ctx->lookup_cleanup = 1;

    return NGX_OK;
}


static void
ngx_mail_smtp_ext_lookup_cleanup(void *data)
{
    ngx_mail_session_t  *s = data;

    ngx_mail_smtp_ext_ctx_t  *ctx;

    ctx = ngx_mail_get_module_ctx(s, ngx_mail_smtp_ext_module);

    ngx_mail_smtp_ext_auth_end(s);

    if (ctx->route_pool) {
        ngx_destroy_pool(ctx->route_pool);
        ctx->route_pool = NULL;
    }

    ngx_mail_smtp_ext_route_release(s);
}

