
/*
 * ngx_mail_smtp_ext: stored password verification.
 */


#ifndef _NGX_MAIL_SMTP_EXT_PASSWD_H_INCLUDED_
#define _NGX_MAIL_SMTP_EXT_PASSWD_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>


#if (NGX_THREADS)
#include <ngx_thread_pool.h>
#else
typedef struct ngx_thread_pool_s  ngx_thread_pool_t;
#endif


/* rc: NGX_OK match, NGX_DECLINED mismatch, NGX_ERROR unknown/bad hash */
typedef void (*ngx_mail_smtp_ext_passwd_handler_pt)(void *data,
    ngx_int_t rc);


/*
 * stored: "{PLAIN}secret" ("{CLEARTEXT}"), "{SHA}", "{SSHA}", "{SHA256}",
 * "{SSHA256}", "{SHA512}", "{SSHA512}" (base64 of digest [+ salt]),
 * or a crypt(3) hash "$id$..." (also "{CRYPT}$...", "{SHA512-CRYPT}$...")
 */
ngx_int_t ngx_mail_smtp_ext_passwd_verify(ngx_str_t *stored,
    ngx_str_t *passwd);

/* 1 for crypt(3) schemes: verify them in a thread */
ngx_uint_t ngx_mail_smtp_ext_passwd_slow(ngx_str_t *stored);

/* "{PLAIN}secret" -> "secret" (no copy); NGX_DECLINED for other schemes */
ngx_int_t ngx_mail_smtp_ext_passwd_plain(ngx_str_t *stored,
    ngx_str_t *plain);

/*
 * Verifies in the thread pool tp (NULL: synchronously); the handler is
 * always called later from the event loop, never from inside this call,
 * and never once session_pool has been destroyed.  NGX_ERROR: the
 * handler will not be called.
 */
ngx_int_t ngx_mail_smtp_ext_passwd_verify_async(ngx_thread_pool_t *tp,
    ngx_pool_t *session_pool, ngx_str_t *stored, ngx_str_t *passwd,
    ngx_mail_smtp_ext_passwd_handler_pt handler, void *data);

/* at configuration time: registers/gets the "default" thread pool */
char *ngx_mail_smtp_ext_passwd_thread_pool(ngx_conf_t *cf,
    ngx_thread_pool_t **tpp);

/* at run time: the "default" thread pool of the cycle, or NULL */
ngx_thread_pool_t *ngx_mail_smtp_ext_passwd_get_thread_pool(
    ngx_cycle_t *cycle);

/* CRAM-MD5 (RFC 2195): hex_digest = hex(HMAC-MD5(secret, challenge)) */
ngx_int_t ngx_mail_smtp_ext_cram_md5_verify(ngx_str_t *plain_secret,
    ngx_str_t *salt, ngx_str_t *hex_digest);


#endif /* _NGX_MAIL_SMTP_EXT_PASSWD_H_INCLUDED_ */
