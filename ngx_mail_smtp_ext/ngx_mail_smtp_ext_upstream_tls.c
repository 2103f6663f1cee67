
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * TLS towards the backends (smtp_ext_upstream_tls_*), on nginx's own
 * ngx_ssl_* helpers as stream's proxy_ssl_* are: the client SSL_CTX of a
 * server, the per-connection setup before the STARTTLS handshake (name,
 * SNI, a cached session) and the checks after it (chain and name).
 *
 * Sessions are cached per worker, by SSL_CTX, backend address and name,
 * in a small table of its own: peers of run-time routes come and go, so
 * nothing points into them.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>

#include "ngx_mail_smtp_ext_module.h"


#if (NGX_MAIL_SSL)

#include <openssl/x509v3.h>


/* sessions kept per worker, the least recently used one goes first */
#define NGX_MAIL_SMTP_EXT_TLS_SESSIONS  128

#define NGX_MAIL_SMTP_EXT_TLS_REASON    256


/* what a backend connection is checked against, and its session key */

typedef struct {
    ngx_ssl_t                      *ssl;
    ngx_sockaddr_t                  sockaddr;
    socklen_t                       socklen;
    ngx_str_t                       name;       /* null-terminated */
    unsigned                        ip:1;       /* name is an address */
    unsigned                        verify:1;
    unsigned                        reuse:1;
} ngx_mail_smtp_ext_tls_peer_t;


typedef struct {
    ngx_queue_t                     queue;      /* most recent first */
    ngx_mail_smtp_ext_tls_peer_t    key;        /* name follows */
    ngx_ssl_session_t              *session;
} ngx_mail_smtp_ext_tls_session_t;


static ngx_int_t ngx_mail_smtp_ext_tls_name(ngx_mail_session_t *s,
    ngx_mail_smtp_ext_tls_peer_t *tp, ngx_mail_smtp_ext_peer_t *peer);
static ngx_uint_t ngx_mail_smtp_ext_tls_is_ip(ngx_str_t *name);
static ngx_int_t ngx_mail_smtp_ext_tls_check_ip(ngx_connection_t *c,
    ngx_str_t *name);
static ngx_mail_smtp_ext_tls_session_t *ngx_mail_smtp_ext_tls_find(
    ngx_mail_smtp_ext_tls_peer_t *tp);
static void ngx_mail_smtp_ext_tls_save_session(ngx_connection_t *c);
static void ngx_mail_smtp_ext_tls_drop(ngx_mail_smtp_ext_tls_peer_t *tp);
static void ngx_mail_smtp_ext_tls_free(ngx_mail_smtp_ext_tls_session_t *ts);
static void ngx_mail_smtp_ext_tls_cleanup(void *data);


ngx_conf_bitmask_t  ngx_mail_smtp_ext_upstream_tls_protocols[] = {
    { ngx_string("SSLv2"), NGX_SSL_SSLv2 },
    { ngx_string("SSLv3"), NGX_SSL_SSLv3 },
    { ngx_string("TLSv1"), NGX_SSL_TLSv1 },
    { ngx_string("TLSv1.1"), NGX_SSL_TLSv1_1 },
    { ngx_string("TLSv1.2"), NGX_SSL_TLSv1_2 },
    { ngx_string("TLSv1.3"), NGX_SSL_TLSv1_3 },
    { ngx_null_string, 0 }
};


/* SSL ex_data slot of a backend connection's ngx_mail_smtp_ext_tls_peer_t */
static int  ngx_mail_smtp_ext_tls_index = -1;

/* the per-worker session table */
static ngx_queue_t  ngx_mail_smtp_ext_tls_sessions;
static ngx_uint_t   ngx_mail_smtp_ext_tls_nsessions;

static u_char  ngx_mail_smtp_ext_tls_reason[NGX_MAIL_SMTP_EXT_TLS_REASON];


/*
 * Builds conf->upstream_ssl from the merged smtp_ext_upstream_tls_*
 * values of a server; errors are "nginx -t" errors.
 */

char *
ngx_mail_smtp_ext_upstream_tls_conf(ngx_conf_t *cf,
    ngx_mail_smtp_ext_srv_conf_t *conf)
{
    ngx_pool_cleanup_t  *cln;

    if (conf->upstream_tls_verify
        && conf->upstream_tls_trusted_certificate.len == 0)
    {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "no \"smtp_ext_upstream_tls_trusted_certificate\" "
                      "for \"smtp_ext_upstream_tls_verify on\" "
                      "in %s:%ui", conf->file_name, conf->line);
        return NGX_CONF_ERROR;
    }

    if (conf->upstream_tls_certificate.len
        && conf->upstream_tls_certificate_key.len == 0)
    {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "no \"smtp_ext_upstream_tls_certificate_key\" is "
                      "defined for certificate \"%V\" in %s:%ui",
                      &conf->upstream_tls_certificate, conf->file_name,
                      conf->line);
        return NGX_CONF_ERROR;
    }

    if (conf->upstream_tls_certificate_key.len
        && conf->upstream_tls_certificate.len == 0)
    {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "no \"smtp_ext_upstream_tls_certificate\" is "
                      "defined for key \"%V\" in %s:%ui",
                      &conf->upstream_tls_certificate_key, conf->file_name,
                      conf->line);
        return NGX_CONF_ERROR;
    }

    if (ngx_mail_smtp_ext_tls_index == -1) {
        ngx_mail_smtp_ext_tls_index = SSL_get_ex_new_index(0, NULL, NULL,
                                                           NULL, NULL);
        if (ngx_mail_smtp_ext_tls_index == -1) {
            ngx_ssl_error(NGX_LOG_EMERG, cf->log, 0,
                          "SSL_get_ex_new_index() failed");
            return NGX_CONF_ERROR;
        }
    }

    conf->upstream_ssl = ngx_pcalloc(cf->pool, sizeof(ngx_ssl_t));
    if (conf->upstream_ssl == NULL) {
        return NGX_CONF_ERROR;
    }

    conf->upstream_ssl->log = cf->log;

    if (ngx_ssl_create(conf->upstream_ssl, conf->upstream_tls_protocols, NULL)
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        ngx_ssl_cleanup_ctx(conf->upstream_ssl);
        return NGX_CONF_ERROR;
    }

    cln->handler = ngx_ssl_cleanup_ctx;
    cln->data = conf->upstream_ssl;

    if (ngx_ssl_ciphers(cf, conf->upstream_ssl, &conf->upstream_tls_ciphers,
                        0)
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    if (conf->upstream_tls_certificate.len) {
        if (ngx_ssl_certificate(cf, conf->upstream_ssl,
                                &conf->upstream_tls_certificate,
                                &conf->upstream_tls_certificate_key, NULL)
            != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    if (conf->upstream_tls_verify) {
        if (ngx_ssl_trusted_certificate(cf, conf->upstream_ssl,
                                    &conf->upstream_tls_trusted_certificate,
                                    conf->upstream_tls_verify_depth)
            != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    if (ngx_ssl_client_session_cache(cf, conf->upstream_ssl,
                                     conf->upstream_tls_session_reuse)
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * Before the handshake with a backend that answered 220 to STARTTLS:
 * the SSL connection, the name to check, SNI, a cached session.
 */

ngx_int_t
ngx_mail_smtp_ext_upstream_tls_init(ngx_mail_session_t *s,
    ngx_connection_t *c, ngx_mail_smtp_ext_peer_t *peer)
{
    ngx_mail_smtp_ext_tls_peer_t     *tp;
    ngx_mail_smtp_ext_srv_conf_t     *sscf;
    ngx_mail_smtp_ext_tls_session_t  *ts;

    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    if (ngx_ssl_create_connection(sscf->upstream_ssl, c,
                                  NGX_SSL_BUFFER|NGX_SSL_CLIENT)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* c->pool is the relay's: it outlives this connection */

    tp = ngx_pcalloc(c->pool, sizeof(ngx_mail_smtp_ext_tls_peer_t));
    if (tp == NULL) {
        return NGX_ERROR;
    }

    tp->ssl = sscf->upstream_ssl;
    tp->verify = sscf->upstream_tls_verify ? 1 : 0;
    tp->reuse = sscf->upstream_tls_session_reuse ? 1 : 0;

    if (peer->socklen <= sizeof(ngx_sockaddr_t)) {
        ngx_memcpy(&tp->sockaddr, peer->sockaddr, peer->socklen);
        tp->socklen = peer->socklen;
    }

    if (ngx_mail_smtp_ext_tls_name(s, tp, peer) != NGX_OK) {
        return NGX_ERROR;
    }

    if (SSL_set_ex_data(c->ssl->connection, ngx_mail_smtp_ext_tls_index, tp)
        == 0)
    {
        ngx_ssl_error(NGX_LOG_ALERT, c->log, 0, "SSL_set_ex_data() failed");
        return NGX_ERROR;
    }

    /* RFC 6066 3: no literal IPv4 or IPv6 address as a server name */

    if (sscf->upstream_tls_server_name && tp->name.len && !tp->ip) {
        if (SSL_set_tlsext_host_name(c->ssl->connection,
                                     (char *) tp->name.data)
            == 0)
        {
            ngx_ssl_error(NGX_LOG_ERR, c->log, 0,
                          "SSL_set_tlsext_host_name(\"%s\") failed",
                          tp->name.data);
            return NGX_ERROR;
        }
    }

    if (!tp->reuse) {
        return NGX_OK;
    }

    c->ssl->save_session = ngx_mail_smtp_ext_tls_save_session;

    ts = ngx_mail_smtp_ext_tls_find(tp);

    if (ts && ngx_ssl_set_session(c, ts->session) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_log_debug2(NGX_LOG_DEBUG_MAIL, c->log, 0,
                   "smtp_ext: backend TLS name \"%V\", session %s",
                   &tp->name, ts ? "reused" : "new");

    return NGX_OK;
}


/*
 * After the handshake: NULL when the backend may be used, else the
 * reason it may not (for the relay's error log line).  Without "verify"
 * nothing is checked, as with proxy_ssl_verify off.
 */

char *
ngx_mail_smtp_ext_upstream_tls_check(ngx_mail_session_t *s,
    ngx_connection_t *c)
{
    long                           rc;
    u_char                        *p, *last;
    ngx_mail_smtp_ext_tls_peer_t  *tp;

    tp = SSL_get_ex_data(c->ssl->connection, ngx_mail_smtp_ext_tls_index);

    if (!c->ssl->handshaked) {
        if (tp) {
            ngx_mail_smtp_ext_tls_drop(tp);
        }

        return "TLS handshake failed";
    }

    if (tp == NULL || !tp->verify) {
        return NULL;
    }

    p = ngx_mail_smtp_ext_tls_reason;
    last = p + NGX_MAIL_SMTP_EXT_TLS_REASON - 1;

    rc = SSL_get_verify_result(c->ssl->connection);

    if (rc != X509_V_OK) {
        p = ngx_snprintf(p, last - p, "TLS certificate verify error: "
                         "(%l:%s)", rc, X509_verify_cert_error_string(rc));
        goto failed;
    }

    if (tp->name.len == 0) {
        p = ngx_snprintf(p, last - p, "TLS certificate not checked: no "
                         "name to check it against (set "
                         "smtp_ext_upstream_tls_name)");
        goto failed;
    }

    if (tp->ip) {
        if (ngx_mail_smtp_ext_tls_check_ip(c, &tp->name) == NGX_OK) {
            return NULL;
        }

    } else if (ngx_ssl_check_host(c, &tp->name) == NGX_OK) {
        return NULL;
    }

    p = ngx_snprintf(p, last - p, "TLS certificate does not match \"%V\"",
                     &tp->name);

failed:

    *p = '\0';

    ngx_mail_smtp_ext_tls_drop(tp);

    return (char *) ngx_mail_smtp_ext_tls_reason;
}


/*
 * The name checked and sent as SNI: smtp_ext_upstream_tls_name, else the
 * host of the peer's address as written ("mx.example.com:25",
 * "127.0.0.1:2525", "[::1]:25"); none for a unix socket.
 */

static ngx_int_t
ngx_mail_smtp_ext_tls_name(ngx_mail_session_t *s,
    ngx_mail_smtp_ext_tls_peer_t *tp, ngx_mail_smtp_ext_peer_t *peer)
{
    u_char                        *p, *last, *colon;
    ngx_str_t                      name;
    ngx_connection_t              *c;
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    c = s->connection;
    sscf = ngx_mail_get_module_srv_conf(s, ngx_mail_smtp_ext_module);

    if (sscf->upstream_tls_name.len) {
        name = sscf->upstream_tls_name;

    } else {
        name = peer->server;

        if (name.len == 0) {
            name = peer->name;
        }

        last = name.data + name.len;

        if (name.len >= 5 && ngx_strncasecmp(name.data, (u_char *) "unix:", 5)
                             == 0)
        {
            name.len = 0;

        } else if (name.len && name.data[0] == '[') {
            p = ngx_strlchr(name.data, last, ']');
            name.len = p ? (size_t) (p - name.data) + 1 : 0;

        } else {
            /* "host:port" or "host"; a bare IPv6 address has two ':' */

            colon = ngx_strlchr(name.data, last, ':');

            if (colon && ngx_strlchr(colon + 1, last, ':') == NULL) {
                name.len = colon - name.data;
            }
        }
    }

    /* "[::1]" is checked as "::1" */

    if (name.len > 2 && name.data[0] == '[' && name.data[name.len - 1] == ']')
    {
        name.data++;
        name.len -= 2;
    }

    tp->name.data = ngx_pnalloc(c->pool, name.len + 1);
    if (tp->name.data == NULL) {
        return NGX_ERROR;
    }

    (void) ngx_cpystrn(tp->name.data, name.data, name.len + 1);
    tp->name.len = name.len;

    tp->ip = ngx_mail_smtp_ext_tls_is_ip(&tp->name);

    return NGX_OK;
}


static ngx_uint_t
ngx_mail_smtp_ext_tls_is_ip(ngx_str_t *name)
{
#if (NGX_HAVE_INET6)
    u_char  addr6[16];
#endif

    if (name->len == 0) {
        return 0;
    }

    if (ngx_inet_addr(name->data, name->len) != INADDR_NONE) {
        return 1;
    }

#if (NGX_HAVE_INET6)
    if (ngx_inet6_addr(name->data, name->len, addr6) == NGX_OK) {
        return 1;
    }
#endif

    return 0;
}


/* an address is matched against the certificate's IP subjectAltNames */

static ngx_int_t
ngx_mail_smtp_ext_tls_check_ip(ngx_connection_t *c, ngx_str_t *name)
{
    int    rc;
    X509  *cert;

    cert = SSL_get_peer_certificate(c->ssl->connection);
    if (cert == NULL) {
        return NGX_ERROR;
    }

    /* name is null-terminated */

    rc = X509_check_ip_asc(cert, (char *) name->data, 0);

    X509_free(cert);

    return rc == 1 ? NGX_OK : NGX_ERROR;
}


/* the session table */

static ngx_mail_smtp_ext_tls_session_t *
ngx_mail_smtp_ext_tls_find(ngx_mail_smtp_ext_tls_peer_t *tp)
{
    ngx_queue_t                      *q;
    ngx_mail_smtp_ext_tls_session_t  *ts;

    if (ngx_mail_smtp_ext_tls_sessions.next == NULL) {
        return NULL;
    }

    for (q = ngx_queue_head(&ngx_mail_smtp_ext_tls_sessions);
         q != ngx_queue_sentinel(&ngx_mail_smtp_ext_tls_sessions);
         q = ngx_queue_next(q))
    {
        ts = ngx_queue_data(q, ngx_mail_smtp_ext_tls_session_t, queue);

        if (ts->key.ssl == tp->ssl
            && ts->key.name.len == tp->name.len
            && ngx_cmp_sockaddr(&ts->key.sockaddr.sockaddr, ts->key.socklen,
                                &tp->sockaddr.sockaddr, tp->socklen, 1)
               == NGX_OK
            && ngx_strncmp(ts->key.name.data, tp->name.data, tp->name.len)
               == 0)
        {
            ngx_queue_remove(q);
            ngx_queue_insert_head(&ngx_mail_smtp_ext_tls_sessions, q);
            return ts;
        }
    }

    return NULL;
}


/*
 * Called by OpenSSL through ngx_ssl_new_client_session() when the backend
 * gives a session: in the handshake with TLS 1.2, after it (a ticket read
 * with the first reply) with TLS 1.3.
 */

static void
ngx_mail_smtp_ext_tls_save_session(ngx_connection_t *c)
{
    ngx_pool_cleanup_t               *cln;
    ngx_ssl_session_t                *session;
    ngx_mail_smtp_ext_tls_peer_t     *tp;
    ngx_mail_smtp_ext_tls_session_t  *ts;

    tp = SSL_get_ex_data(c->ssl->connection, ngx_mail_smtp_ext_tls_index);
    if (tp == NULL || tp->socklen == 0) {
        return;
    }

    /* a chain that does not verify is never resumed */

    if (tp->verify
        && SSL_get_verify_result(c->ssl->connection) != X509_V_OK)
    {
        return;
    }

    session = ngx_ssl_get_session(c);
    if (session == NULL) {
        return;
    }

    ts = ngx_mail_smtp_ext_tls_find(tp);

    if (ts) {
        ngx_ssl_free_session(ts->session);
        ts->session = session;
        return;
    }

    if (ngx_mail_smtp_ext_tls_sessions.next == NULL) {

        /* freed when the worker's cycle pool goes, at its exit */

        cln = ngx_pool_cleanup_add(ngx_cycle->pool, 0);
        if (cln == NULL) {
            ngx_ssl_free_session(session);
            return;
        }

        cln->handler = ngx_mail_smtp_ext_tls_cleanup;
        cln->data = NULL;

        ngx_queue_init(&ngx_mail_smtp_ext_tls_sessions);
    }

    if (ngx_mail_smtp_ext_tls_nsessions >= NGX_MAIL_SMTP_EXT_TLS_SESSIONS) {
        ts = ngx_queue_data(ngx_queue_last(&ngx_mail_smtp_ext_tls_sessions),
                            ngx_mail_smtp_ext_tls_session_t, queue);
        ngx_mail_smtp_ext_tls_free(ts);
    }

    ts = ngx_alloc(sizeof(ngx_mail_smtp_ext_tls_session_t) + tp->name.len + 1,
                   c->log);
    if (ts == NULL) {
        ngx_ssl_free_session(session);
        return;
    }

    ts->key = *tp;
    ts->key.name.data = (u_char *) (ts + 1);
    (void) ngx_cpystrn(ts->key.name.data, tp->name.data, tp->name.len + 1);
    ts->session = session;

    ngx_queue_insert_head(&ngx_mail_smtp_ext_tls_sessions, &ts->queue);
    ngx_mail_smtp_ext_tls_nsessions++;

    ngx_log_debug1(NGX_LOG_DEBUG_MAIL, c->log, 0,
                   "smtp_ext: backend TLS session saved for \"%V\"",
                   &tp->name);
}


/* a backend that failed the checks: its session is not offered again */

static void
ngx_mail_smtp_ext_tls_drop(ngx_mail_smtp_ext_tls_peer_t *tp)
{
    ngx_mail_smtp_ext_tls_session_t  *ts;

    ts = ngx_mail_smtp_ext_tls_find(tp);

    if (ts) {
        ngx_mail_smtp_ext_tls_free(ts);
    }
}


static void
ngx_mail_smtp_ext_tls_free(ngx_mail_smtp_ext_tls_session_t *ts)
{
    ngx_queue_remove(&ts->queue);
    ngx_mail_smtp_ext_tls_nsessions--;

    ngx_ssl_free_session(ts->session);
    ngx_free(ts);
}


static void
ngx_mail_smtp_ext_tls_cleanup(void *data)
{
    ngx_queue_t  *q;

    while (!ngx_queue_empty(&ngx_mail_smtp_ext_tls_sessions)) {
        q = ngx_queue_head(&ngx_mail_smtp_ext_tls_sessions);
        ngx_mail_smtp_ext_tls_free(ngx_queue_data(q,
                                       ngx_mail_smtp_ext_tls_session_t,
                                       queue));
    }

    ngx_mail_smtp_ext_tls_sessions.next = NULL;
}

#endif
