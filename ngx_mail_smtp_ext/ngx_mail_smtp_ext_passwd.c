
/*
 * ngx_mail_smtp_ext: stored password verification.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>

#include <crypt.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "ngx_smtp_core.h"
#include "ngx_mail_smtp_ext_passwd.h"


#define NGX_MAIL_SMTP_EXT_PASSWD_MAX_B64  1024


typedef struct {
    ngx_smtp_pw_scheme_e                  scheme;
    const EVP_MD                       *(*md)(void);
    ngx_uint_t                            salted;
} ngx_mail_smtp_ext_passwd_digest_t;


typedef struct {
#if (NGX_THREADS)
    ngx_thread_task_t                     task;
#endif
    ngx_event_t                           event;    /* posted delivery */
    ngx_mail_smtp_ext_passwd_handler_pt   handler;
    void                                 *data;
    ngx_pool_cleanup_t                   *cln;
    ngx_str_t                             stored;
    ngx_str_t                             passwd;
    ngx_int_t                             rc;
    size_t                                size;
    ngx_uint_t                            detached;
} ngx_mail_smtp_ext_passwd_ctx_t;


static ngx_int_t ngx_mail_smtp_ext_passwd_digest(
    ngx_mail_smtp_ext_passwd_digest_t *d, ngx_str_t *encoded,
    ngx_str_t *passwd);
static ngx_int_t ngx_mail_smtp_ext_passwd_crypt(ngx_str_t *hash,
    ngx_str_t *passwd);
#if (NGX_THREADS)
static void ngx_mail_smtp_ext_passwd_thread(void *data, ngx_log_t *log);
#endif
static void ngx_mail_smtp_ext_passwd_done(ngx_event_t *ev);
static void ngx_mail_smtp_ext_passwd_cleanup(void *data);
static void ngx_mail_smtp_ext_passwd_cleanup_unused(void *data);
static void ngx_mail_smtp_ext_passwd_free(
    ngx_mail_smtp_ext_passwd_ctx_t *ctx);


static ngx_mail_smtp_ext_passwd_digest_t  ngx_mail_smtp_ext_passwd_digests[] = {
    { NGX_SMTP_PW_SHA, EVP_sha1, 0 },
    { NGX_SMTP_PW_SSHA, EVP_sha1, 1 },
    { NGX_SMTP_PW_SHA256, EVP_sha256, 0 },
    { NGX_SMTP_PW_SSHA256, EVP_sha256, 1 },
    { NGX_SMTP_PW_SHA512, EVP_sha512, 0 },
    { NGX_SMTP_PW_SSHA512, EVP_sha512, 1 },
    { NGX_SMTP_PW_INVALID, NULL, 0 }
};


#if (NGX_THREADS)
static ngx_str_t  ngx_mail_smtp_ext_passwd_pool_name = ngx_string("default");
#endif


ngx_int_t
ngx_mail_smtp_ext_passwd_verify(ngx_str_t *stored, ngx_str_t *passwd)
{
    ngx_str_t                           rest;
    ngx_smtp_pw_scheme_e                scheme;
    ngx_mail_smtp_ext_passwd_digest_t  *d;

    scheme = ngx_smtp_passwd_scheme(stored->data, stored->len,
                                    (ngx_smtp_str_t *) &rest);

    switch (scheme) {

    case NGX_SMTP_PW_CRYPT:
        return ngx_mail_smtp_ext_passwd_crypt(&rest, passwd);

    case NGX_SMTP_PW_PLAIN:

        /* the length is not secret, the contents are */

        if (rest.len != passwd->len || rest.len == 0) {
            return NGX_DECLINED;
        }

        return CRYPTO_memcmp(rest.data, passwd->data, rest.len) == 0
               ? NGX_OK : NGX_DECLINED;

    default:
        break;
    }

    for (d = ngx_mail_smtp_ext_passwd_digests; d->md; d++) {
        if (d->scheme == scheme) {
            return ngx_mail_smtp_ext_passwd_digest(d, &rest, passwd);
        }
    }

    return NGX_ERROR;
}


ngx_uint_t
ngx_mail_smtp_ext_passwd_slow(ngx_str_t *stored)
{
    ngx_smtp_str_t  rest;

    return ngx_smtp_passwd_scheme(stored->data, stored->len, &rest)
           == NGX_SMTP_PW_CRYPT;
}


ngx_int_t
ngx_mail_smtp_ext_passwd_plain(ngx_str_t *stored, ngx_str_t *plain)
{
    if (ngx_smtp_passwd_scheme(stored->data, stored->len,
                               (ngx_smtp_str_t *) plain)
        == NGX_SMTP_PW_PLAIN)
    {
        return NGX_OK;
    }

    return NGX_DECLINED;
}


static ngx_int_t
ngx_mail_smtp_ext_passwd_digest(ngx_mail_smtp_ext_passwd_digest_t *d,
    ngx_str_t *encoded, ngx_str_t *passwd)
{
    int            mdlen;
    ngx_int_t      rc;
    ngx_str_t      decoded;
    unsigned int   len;
    const EVP_MD  *md;
    EVP_MD_CTX    *ctx;
    u_char         buf[NGX_MAIL_SMTP_EXT_PASSWD_MAX_B64];
    u_char         digest[EVP_MAX_MD_SIZE];

    if (encoded->len == 0
        || ngx_base64_decoded_length(encoded->len) > sizeof(buf))
    {
        return NGX_ERROR;
    }

    decoded.data = buf;

    if (ngx_decode_base64(&decoded, encoded) != NGX_OK) {
        return NGX_ERROR;
    }

    md = d->md();
    mdlen = EVP_MD_size(md);

    if (mdlen <= 0
        || (d->salted ? decoded.len <= (size_t) mdlen
                      : decoded.len != (size_t) mdlen))
    {
        return NGX_ERROR;
    }

    ctx = EVP_MD_CTX_new();
    if (ctx == NULL) {
        return NGX_ERROR;
    }

    /* digest(password + salt), the salt follows the digest */

    if (EVP_DigestInit_ex(ctx, md, NULL) != 1
        || EVP_DigestUpdate(ctx, passwd->data, passwd->len) != 1
        || (d->salted
            && EVP_DigestUpdate(ctx, decoded.data + mdlen,
                                decoded.len - mdlen) != 1)
        || EVP_DigestFinal_ex(ctx, digest, &len) != 1
        || len != (unsigned int) mdlen)
    {
        rc = NGX_ERROR;

    } else {
        rc = CRYPTO_memcmp(digest, decoded.data, mdlen) == 0
             ? NGX_OK : NGX_DECLINED;
    }

    EVP_MD_CTX_free(ctx);

    ngx_explicit_memzero(digest, sizeof(digest));

    return rc;
}


static ngx_int_t
ngx_mail_smtp_ext_passwd_crypt(ngx_str_t *hash, ngx_str_t *passwd)
{
    char               *out;
    size_t              size, len;
    u_char             *key, *setting;
    ngx_int_t           rc;
    struct crypt_data  *cd;

    /* crypt() stops at NUL: "secret\0junk" must not match "secret" */

    if (hash->len == 0 || ngx_strlchr(passwd->data,
                                      passwd->data + passwd->len, '\0'))
    {
        return NGX_DECLINED;
    }

    size = sizeof(struct crypt_data) + passwd->len + 1 + hash->len + 1;

    /* struct crypt_data is large and must start zeroed */

    cd = ngx_calloc(size, ngx_cycle->log);
    if (cd == NULL) {
        return NGX_ERROR;
    }

    key = (u_char *) (cd + 1);
    ngx_memcpy(key, passwd->data, passwd->len);
    key[passwd->len] = '\0';

    setting = key + passwd->len + 1;
    ngx_memcpy(setting, hash->data, hash->len);
    setting[hash->len] = '\0';

#ifdef XCRYPT_VERSION_NUM
    out = crypt_rn((char *) key, (char *) setting, cd, sizeof(*cd));
#else
    out = crypt_r((char *) key, (char *) setting, cd);
#endif

    if (out == NULL || out[0] == '*') {
        rc = NGX_ERROR;

    } else {
        len = ngx_strlen(out);

        rc = (len == hash->len && CRYPTO_memcmp(out, hash->data, len) == 0)
             ? NGX_OK : NGX_DECLINED;
    }

    ngx_explicit_memzero(cd, size);
    ngx_free(cd);

    return rc;
}


/* asynchronous verification */

ngx_int_t
ngx_mail_smtp_ext_passwd_verify_async(ngx_thread_pool_t *tp,
    ngx_pool_t *session_pool, ngx_str_t *stored, ngx_str_t *passwd,
    ngx_mail_smtp_ext_passwd_handler_pt handler, void *data)
{
    size_t                           size;
    u_char                          *p;
    ngx_pool_cleanup_t              *cln;
    ngx_mail_smtp_ext_passwd_ctx_t  *ctx;

    /* reuse the entry of a finished verification of this session */

    for (cln = session_pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_mail_smtp_ext_passwd_cleanup_unused) {
            break;
        }
    }

    if (cln == NULL) {
        cln = ngx_pool_cleanup_add(session_pool, 0);
        if (cln == NULL) {
            return NGX_ERROR;
        }
    }

    /* not in the session pool: a thread may use it after the session */

    size = sizeof(ngx_mail_smtp_ext_passwd_ctx_t) + stored->len + passwd->len;

    ctx = ngx_calloc(size, ngx_cycle->log);
    if (ctx == NULL) {
        return NGX_ERROR;
    }

    p = (u_char *) (ctx + 1);

    ctx->stored.data = p;
    ctx->stored.len = stored->len;
    p = ngx_cpymem(p, stored->data, stored->len);

    ctx->passwd.data = p;
    ctx->passwd.len = passwd->len;
    ngx_memcpy(p, passwd->data, passwd->len);

    ctx->handler = handler;
    ctx->data = data;
    ctx->cln = cln;
    ctx->size = size;
    ctx->rc = NGX_ERROR;

    cln->handler = ngx_mail_smtp_ext_passwd_cleanup;
    cln->data = ctx;

    ctx->event.handler = ngx_mail_smtp_ext_passwd_done;
    ctx->event.data = ctx;
    ctx->event.log = ngx_cycle->log;

#if (NGX_THREADS)

    if (tp) {
        ctx->task.ctx = ctx;
        ctx->task.handler = ngx_mail_smtp_ext_passwd_thread;
        ctx->task.event.handler = ngx_mail_smtp_ext_passwd_done;
        ctx->task.event.data = ctx;
        ctx->task.event.log = ngx_cycle->log;

        if (ngx_thread_task_post(tp, &ctx->task) == NGX_OK) {
            return NGX_OK;
        }

        /* queue overflow: a temporary failure, not a stalled worker */

        ngx_explicit_memzero(ctx->passwd.data, ctx->passwd.len);
        ngx_post_event(&ctx->event, &ngx_posted_events);

        return NGX_OK;
    }

#endif

    ctx->rc = ngx_mail_smtp_ext_passwd_verify(&ctx->stored, &ctx->passwd);
    ngx_explicit_memzero(ctx->passwd.data, ctx->passwd.len);

    ngx_post_event(&ctx->event, &ngx_posted_events);

    return NGX_OK;
}


#if (NGX_THREADS)

static void
ngx_mail_smtp_ext_passwd_thread(void *data, ngx_log_t *log)
{
    ngx_mail_smtp_ext_passwd_ctx_t  *ctx = data;

    ctx->rc = ngx_mail_smtp_ext_passwd_verify(&ctx->stored, &ctx->passwd);
    ngx_explicit_memzero(ctx->passwd.data, ctx->passwd.len);
}

#endif


/* on the event loop: thread completion or the posted event */

static void
ngx_mail_smtp_ext_passwd_done(ngx_event_t *ev)
{
    ngx_mail_smtp_ext_passwd_ctx_t  *ctx;

    ctx = ev->data;

    if (!ctx->detached) {

        /* the handler may destroy the session pool */

        if (ctx->cln) {
            ctx->cln->handler = ngx_mail_smtp_ext_passwd_cleanup_unused;
            ctx->cln = NULL;
        }

        ctx->handler(ctx->data, ctx->rc);
    }

    ngx_mail_smtp_ext_passwd_free(ctx);
}


static void
ngx_mail_smtp_ext_passwd_cleanup(void *data)
{
    ngx_mail_smtp_ext_passwd_ctx_t  *ctx = data;

    ctx->cln = NULL;
    ctx->detached = 1;

    if (ctx->event.posted) {
        ngx_delete_posted_event(&ctx->event);
        ngx_mail_smtp_ext_passwd_free(ctx);
        return;
    }

    /* in a thread: the completion handler frees it */
}


static void
ngx_mail_smtp_ext_passwd_cleanup_unused(void *data)
{
    /* a finished verification */
}


static void
ngx_mail_smtp_ext_passwd_free(ngx_mail_smtp_ext_passwd_ctx_t *ctx)
{
    ngx_explicit_memzero(ctx, ctx->size);
    ngx_free(ctx);
}


char *
ngx_mail_smtp_ext_passwd_thread_pool(ngx_conf_t *cf, ngx_thread_pool_t **tpp)
{
#if (NGX_THREADS)

    *tpp = ngx_thread_pool_add(cf, NULL);

    if (*tpp == NULL) {
        return NGX_CONF_ERROR;
    }

#else

    *tpp = NULL;

#endif

    return NGX_CONF_OK;
}


ngx_thread_pool_t *
ngx_mail_smtp_ext_passwd_get_thread_pool(ngx_cycle_t *cycle)
{
#if (NGX_THREADS)
    return ngx_thread_pool_get(cycle, &ngx_mail_smtp_ext_passwd_pool_name);
#else
    return NULL;
#endif
}


ngx_int_t
ngx_mail_smtp_ext_cram_md5_verify(ngx_str_t *plain_secret, ngx_str_t *salt,
    ngx_str_t *hex_digest)
{
    ngx_int_t     rc;
    unsigned int  len;
    u_char        md[EVP_MAX_MD_SIZE];
    u_char        expected[32], got[32];

    if (hex_digest->len != 32 || plain_secret->len == 0) {
        return NGX_DECLINED;
    }

    if (HMAC(EVP_md5(), plain_secret->data, (int) plain_secret->len,
             salt->data, salt->len, md, &len)
        == NULL || len != 16)
    {
        return NGX_ERROR;
    }

    ngx_hex_dump(expected, md, 16);
    ngx_strlow(got, hex_digest->data, 32);

    rc = CRYPTO_memcmp(expected, got, 32) == 0 ? NGX_OK : NGX_DECLINED;

    ngx_explicit_memzero(md, sizeof(md));
    ngx_explicit_memzero(expected, sizeof(expected));

    return rc;
}
