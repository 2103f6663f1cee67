
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_mail.h>
#if (NGX_MAIL_SSL)
#include <ngx_mail_ssl_module.h>
#endif

#include "ngx_mail_smtp_ext_module.h"
#include "ngx_mail_smtp_ext_cache.h"
#include "ngx_mail_smtp_ext_version.h"
#include "ngx_mail_smtp_ext_edge.h"


static void *ngx_mail_smtp_ext_create_main_conf(ngx_conf_t *cf);
static char *ngx_mail_smtp_ext_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_mail_smtp_ext_create_srv_conf(ngx_conf_t *cf);
static char *ngx_mail_smtp_ext_merge_srv_conf(ngx_conf_t *cf, void *parent,
    void *child);
static char *ngx_mail_smtp_ext_build_replies(ngx_conf_t *cf,
    ngx_mail_smtp_ext_srv_conf_t *conf);
static char *ngx_mail_smtp_ext_pass(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_mail_smtp_ext_auth_methods_set(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_mail_smtp_ext_auth_fail_limit(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_mail_smtp_ext_redis(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_mail_smtp_ext_redis_sentinel(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_mail_smtp_ext_init_module(ngx_cycle_t *cycle);
static ngx_int_t ngx_mail_smtp_ext_init_process(ngx_cycle_t *cycle);
static void ngx_mail_smtp_ext_exit_process(ngx_cycle_t *cycle);
#if (NGX_MAIL_SSL)
static char *ngx_mail_smtp_ext_upstream_ssl(ngx_conf_t *cf,
    ngx_mail_smtp_ext_srv_conf_t *conf);
#endif


extern ngx_module_t  ngx_mail_module;
extern ngx_module_t  ngx_mail_auth_http_module;


static ngx_conf_enum_t  ngx_mail_smtp_ext_tls_modes[] = {
    { ngx_string("off"), NGX_MAIL_SMTP_EXT_TLS_OFF },
    { ngx_string("on"), NGX_MAIL_SMTP_EXT_TLS_ON },
    { ngx_string("required"), NGX_MAIL_SMTP_EXT_TLS_REQUIRED },
    { ngx_null_string, 0 }
};


static ngx_conf_enum_t  ngx_mail_smtp_ext_bare_lf_modes[] = {
    { ngx_string("normalize"), NGX_SMTP_BARE_LF_NORMALIZE },
    { ngx_string("reject"), NGX_SMTP_BARE_LF_REJECT },
    { ngx_null_string, 0 }
};


static ngx_conf_bitmask_t  ngx_mail_smtp_ext_auth_methods[] = {
    { ngx_string("plain"), NGX_MAIL_SMTP_EXT_AUTH_PLAIN },
    { ngx_string("login"), NGX_MAIL_SMTP_EXT_AUTH_LOGIN },
    { ngx_string("cram-md5"), NGX_MAIL_SMTP_EXT_AUTH_CRAM_MD5 },
    { ngx_null_string, 0 }
};


static ngx_command_t  ngx_mail_smtp_ext_commands[] = {

    { ngx_string("smtp_ext_redis"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_1MORE,
      ngx_mail_smtp_ext_redis,
      NGX_MAIL_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("smtp_ext_redis_cache"),
      NGX_MAIL_MAIN_CONF|NGX_CONF_TAKE123,
      ngx_mail_smtp_ext_cache_conf,
      NGX_MAIL_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("smtp_ext_redis_sentinel"),
      NGX_MAIL_MAIN_CONF|NGX_CONF_2MORE,
      ngx_mail_smtp_ext_redis_sentinel,
      NGX_MAIL_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("smtp_ext_upstream"),
      NGX_MAIL_MAIN_CONF|NGX_CONF_BLOCK|NGX_CONF_TAKE1,
      ngx_mail_smtp_ext_upstream_block,
      NGX_MAIL_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("smtp_ext_pass"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_mail_smtp_ext_pass,
      NGX_MAIL_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("smtp_ext_auth"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_1MORE,
      ngx_mail_smtp_ext_auth_methods_set,
      NGX_MAIL_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("smtp_ext_require_auth"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, require_auth),
      NULL },

    { ngx_string("smtp_ext_max_message_size"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_off_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, max_message_size),
      NULL },

    { ngx_string("smtp_ext_max_recipients"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, max_recipients),
      NULL },

    { ngx_string("smtp_ext_xclient"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, xclient),
      NULL },

    { ngx_string("smtp_ext_proxy_protocol"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, proxy_protocol),
      NULL },

    { ngx_string("smtp_ext_upstream_tls"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, upstream_tls),
      &ngx_mail_smtp_ext_tls_modes },

#if (NGX_MAIL_SSL)

    { ngx_string("smtp_ext_upstream_tls_verify"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, upstream_tls_verify),
      NULL },

    { ngx_string("smtp_ext_upstream_tls_verify_depth"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, upstream_tls_verify_depth),
      NULL },

    { ngx_string("smtp_ext_upstream_tls_trusted_certificate"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t,
               upstream_tls_trusted_certificate),
      NULL },

    { ngx_string("smtp_ext_upstream_tls_name"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, upstream_tls_name),
      NULL },

    { ngx_string("smtp_ext_upstream_tls_server_name"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, upstream_tls_server_name),
      NULL },

    { ngx_string("smtp_ext_upstream_tls_certificate"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, upstream_tls_certificate),
      NULL },

    { ngx_string("smtp_ext_upstream_tls_certificate_key"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, upstream_tls_certificate_key),
      NULL },

    { ngx_string("smtp_ext_upstream_tls_protocols"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_1MORE,
      ngx_conf_set_bitmask_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, upstream_tls_protocols),
      &ngx_mail_smtp_ext_upstream_tls_protocols },

    { ngx_string("smtp_ext_upstream_tls_ciphers"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, upstream_tls_ciphers),
      NULL },

    { ngx_string("smtp_ext_upstream_tls_session_reuse"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, upstream_tls_session_reuse),
      NULL },

#endif

    { ngx_string("smtp_ext_connect_timeout"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, connect_timeout),
      NULL },

    { ngx_string("smtp_ext_upstream_timeout"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, upstream_timeout),
      NULL },

    { ngx_string("smtp_ext_dsn"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, dsn),
      NULL },

    { ngx_string("smtp_ext_chunking"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, chunking),
      NULL },

    { ngx_string("smtp_ext_min_data_rate"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, min_data_rate),
      NULL },

    { ngx_string("smtp_ext_bare_lf"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, bare_lf),
      &ngx_mail_smtp_ext_bare_lf_modes },

    { ngx_string("smtp_ext_auth_fail_limit"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE12,
      ngx_mail_smtp_ext_auth_fail_limit,
      NGX_MAIL_SRV_CONF_OFFSET,
      0,
      NULL },

    /* edge protection, SPEC §10 (ngx_mail_smtp_ext_edge.h) */

    { ngx_string("smtp_ext_limit_exempt"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_1MORE,
      ngx_mail_smtp_ext_limit_exempt,
      NGX_MAIL_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("smtp_ext_limit_conn"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_mail_smtp_ext_limit_conn,
      NGX_MAIL_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("smtp_ext_ratelimit"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_2MORE,
      ngx_mail_smtp_ext_ratelimit,
      NGX_MAIL_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("smtp_ext_greeting_delay"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, greeting_delay),
      NULL },

    { ngx_string("smtp_ext_dnsbl"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_1MORE,
      ngx_mail_smtp_ext_dnsbl,
      NGX_MAIL_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("smtp_ext_dnsbl_threshold"),
      NGX_MAIL_MAIN_CONF|NGX_MAIL_SRV_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_MAIL_SRV_CONF_OFFSET,
      offsetof(ngx_mail_smtp_ext_srv_conf_t, dnsbl_threshold),
      NULL },

      ngx_null_command
};


static ngx_mail_protocol_t  ngx_mail_smtp_ext_protocol = {
    ngx_string("smtp_ext"),
    ngx_string("\x04smtp"),
    { 0, 0, 0, 0 },                 /* never guessed from a listen port */
    NGX_MAIL_SMTP_PROTOCOL,

    ngx_mail_smtp_ext_init_session,
    ngx_mail_smtp_ext_init_protocol,
    ngx_mail_smtp_ext_parse_command,
    ngx_mail_smtp_ext_auth_state,

    ngx_string("451 4.3.2 Internal server error" CRLF),
    ngx_string("421 4.7.1 SSL certificate error" CRLF),
    ngx_string("421 4.7.1 No required SSL certificate" CRLF)
};


static ngx_mail_module_t  ngx_mail_smtp_ext_module_ctx = {
    &ngx_mail_smtp_ext_protocol,            /* protocol */

    ngx_mail_smtp_ext_create_main_conf,     /* create main configuration */
    ngx_mail_smtp_ext_init_main_conf,       /* init main configuration */

    ngx_mail_smtp_ext_create_srv_conf,      /* create server configuration */
    ngx_mail_smtp_ext_merge_srv_conf        /* merge server configuration */
};


ngx_module_t  ngx_mail_smtp_ext_module = {
    NGX_MODULE_V1,
    &ngx_mail_smtp_ext_module_ctx,          /* module context */
    ngx_mail_smtp_ext_commands,             /* module directives */
    NGX_MAIL_MODULE,                        /* module type */
    NULL,                                   /* init master */
    ngx_mail_smtp_ext_init_module,          /* init module */
    ngx_mail_smtp_ext_init_process,         /* init process */
    NULL,                                   /* init thread */
    NULL,                                   /* exit thread */
    ngx_mail_smtp_ext_exit_process,         /* exit process */
    NULL,                                   /* exit master */
    NGX_MODULE_V1_PADDING
};


/*
 * The placeholder auth_http peer of smtp_ext servers: it satisfies the
 * auth_http merge check and is never connected to (we never call
 * ngx_mail_auth()).
 */

/*
 * It is written through the first member of ngx_mail_auth_http_conf_t,
 * private to that module: its peer pointer, unchanged from nginx 1.22.1
 * to 1.31.5.  Another version needs that layout checked first.
 */

#if (nginx_version < 1022000 || nginx_version >= 1032000)
#error "ngx_mail_smtp_ext: the auth_http placeholder is known to fit \
nginx 1.22 to 1.31 only"
#endif

static struct sockaddr_in  ngx_mail_smtp_ext_no_auth_sin = {
    .sin_family = AF_INET
};

static ngx_addr_t  ngx_mail_smtp_ext_no_auth_peer = {
    (struct sockaddr *) &ngx_mail_smtp_ext_no_auth_sin,
    sizeof(struct sockaddr_in),
    ngx_string("smtp_ext-needs-no-auth_http")
};


static void *
ngx_mail_smtp_ext_create_main_conf(ngx_conf_t *cf)
{
    ngx_mail_smtp_ext_main_conf_t  *smcf;

    smcf = ngx_pcalloc(cf->pool, sizeof(ngx_mail_smtp_ext_main_conf_t));
    if (smcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&smcf->pools, cf->pool, 4,
                       sizeof(ngx_mail_smtp_ext_pool_t *))
        != NGX_OK)
    {
        return NULL;
    }

    return smcf;
}


static char *
ngx_mail_smtp_ext_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_uint_t                  i, ours, auth_http;
    ngx_addr_t                **peer;
    ngx_mail_core_srv_conf_t  **cscfp;
    ngx_mail_core_main_conf_t  *cmcf;

    /*
     * ngx_mail_auth_http_module refuses every server without auth_http.
     * The addon's ngx_module_order puts us before it, so this runs before
     * its merge: give our servers a placeholder peer (its conf starts with
     * the peer pointer), leave stock servers alone.
     */

    if (ngx_mail_smtp_ext_redis_sentinel_resolve(cf,
            &((ngx_mail_smtp_ext_main_conf_t *) conf)->redis,
            &((ngx_mail_smtp_ext_main_conf_t *) conf)->redis_sentinels)
        != NGX_CONF_OK)
    {
        return NGX_CONF_ERROR;
    }

    ours = 0;
    auth_http = 0;

    for (i = 0; cf->cycle->modules[i]; i++) {
        if (cf->cycle->modules[i] == &ngx_mail_smtp_ext_module) {
            ours = i;

        } else if (cf->cycle->modules[i] == &ngx_mail_auth_http_module) {
            auth_http = i;
        }
    }

    cmcf = ngx_mail_conf_get_module_main_conf(cf, ngx_mail_core_module);
    cscfp = cmcf->servers.elts;

    for (i = 0; i < cmcf->servers.nelts; i++) {

        if (cscfp[i]->protocol != &ngx_mail_smtp_ext_protocol) {
            continue;
        }

        if (ours > auth_http) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "ngx_mail_smtp_ext_module must be loaded as a "
                          "dynamic module after ngx_mail_module");
            return NGX_CONF_ERROR;
        }

        peer = (ngx_addr_t **)
               cscfp[i]->ctx->srv_conf[ngx_mail_auth_http_module.ctx_index];

        if (*peer == NULL) {
            *peer = &ngx_mail_smtp_ext_no_auth_peer;
        }
    }

    /* SPEC 9: the counters are kept whether or not anyone reads them */
    if (ngx_mail_smtp_ext_metrics_conf(cf, conf, &ngx_mail_smtp_ext_protocol)
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static void *
ngx_mail_smtp_ext_create_srv_conf(ngx_conf_t *cf)
{
    ngx_mail_smtp_ext_srv_conf_t  *sscf;

    sscf = ngx_pcalloc(cf->pool, sizeof(ngx_mail_smtp_ext_srv_conf_t));
    if (sscf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     sscf->pass_name = { 0, NULL };
     *     sscf->pass = NULL;
     *     sscf->greeting etc. = { 0, NULL };
     */

    sscf->auth_methods = NGX_CONF_UNSET_UINT;
    sscf->require_auth = NGX_CONF_UNSET;
    sscf->max_message_size = NGX_CONF_UNSET;
    sscf->max_recipients = NGX_CONF_UNSET_UINT;
    sscf->xclient = NGX_CONF_UNSET;
    sscf->proxy_protocol = NGX_CONF_UNSET;
    sscf->upstream_tls = NGX_CONF_UNSET_UINT;
    sscf->connect_timeout = NGX_CONF_UNSET_MSEC;
    sscf->upstream_timeout = NGX_CONF_UNSET_MSEC;
    sscf->min_data_rate = NGX_CONF_UNSET_UINT;
    sscf->dsn = NGX_CONF_UNSET;
    sscf->chunking = NGX_CONF_UNSET;
    sscf->bare_lf = NGX_CONF_UNSET_UINT;
    sscf->auth_fail_limit = NGX_CONF_UNSET_UINT;
    sscf->auth_fail_window = NGX_CONF_UNSET;

#if (NGX_MAIL_SSL)
    /* upstream_tls_* strings and protocols: set by ngx_pcalloc() */
    sscf->upstream_tls_verify = NGX_CONF_UNSET;
    sscf->upstream_tls_verify_depth = NGX_CONF_UNSET_UINT;
    sscf->upstream_tls_server_name = NGX_CONF_UNSET;
    sscf->upstream_tls_session_reuse = NGX_CONF_UNSET;
#endif

    ngx_mail_smtp_ext_edge_create_conf(sscf);    /* SPEC §10 */

    sscf->file_name = cf->conf_file->file.name.data;
    sscf->line = cf->conf_file->line;

    return sscf;
}


static char *
ngx_mail_smtp_ext_merge_srv_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_mail_smtp_ext_srv_conf_t *prev = parent;
    ngx_mail_smtp_ext_srv_conf_t *conf = child;

    ngx_mail_core_srv_conf_t       *cscf;
    ngx_mail_smtp_ext_main_conf_t  *smcf;

    ngx_conf_merge_uint_value(conf->auth_methods, prev->auth_methods, 0);
    ngx_conf_merge_value(conf->require_auth, prev->require_auth, 0);
    ngx_conf_merge_off_value(conf->max_message_size, prev->max_message_size,
                             10 * 1024 * 1024);
    ngx_conf_merge_uint_value(conf->max_recipients, prev->max_recipients,
                              100);
    ngx_conf_merge_value(conf->xclient, prev->xclient, 1);
    ngx_conf_merge_value(conf->proxy_protocol, prev->proxy_protocol, 0);
    ngx_conf_merge_uint_value(conf->upstream_tls, prev->upstream_tls,
                              NGX_MAIL_SMTP_EXT_TLS_OFF);
#if (NGX_MAIL_SSL)
    ngx_conf_merge_value(conf->upstream_tls_verify,
                         prev->upstream_tls_verify, 0);
    ngx_conf_merge_uint_value(conf->upstream_tls_verify_depth,
                              prev->upstream_tls_verify_depth, 1);
    ngx_conf_merge_str_value(conf->upstream_tls_trusted_certificate,
                             prev->upstream_tls_trusted_certificate, "");
    ngx_conf_merge_str_value(conf->upstream_tls_name,
                             prev->upstream_tls_name, "");
    ngx_conf_merge_value(conf->upstream_tls_server_name,
                         prev->upstream_tls_server_name, 0);
    ngx_conf_merge_str_value(conf->upstream_tls_certificate,
                             prev->upstream_tls_certificate, "");
    ngx_conf_merge_str_value(conf->upstream_tls_certificate_key,
                             prev->upstream_tls_certificate_key, "");
    ngx_conf_merge_bitmask_value(conf->upstream_tls_protocols,
                                 prev->upstream_tls_protocols,
                                 (NGX_CONF_BITMASK_SET|NGX_SSL_TLSv1_2
                                  |NGX_SSL_TLSv1_3));
    ngx_conf_merge_str_value(conf->upstream_tls_ciphers,
                             prev->upstream_tls_ciphers, "DEFAULT");
    ngx_conf_merge_value(conf->upstream_tls_session_reuse,
                         prev->upstream_tls_session_reuse, 1);
#endif
    ngx_conf_merge_msec_value(conf->connect_timeout, prev->connect_timeout,
                              10000);
    ngx_conf_merge_msec_value(conf->upstream_timeout,
                              prev->upstream_timeout, 300000);
    ngx_conf_merge_uint_value(conf->bare_lf, prev->bare_lf,
                              NGX_SMTP_BARE_LF_NORMALIZE);
    ngx_conf_merge_uint_value(conf->auth_fail_limit, prev->auth_fail_limit,
                              5);
    ngx_conf_merge_value(conf->auth_fail_window, prev->auth_fail_window, 600);
    ngx_conf_merge_uint_value(conf->min_data_rate, prev->min_data_rate, 500);
    ngx_conf_merge_value(conf->dsn, prev->dsn, 0);
    ngx_conf_merge_value(conf->chunking, prev->chunking, 1);

    if (conf->pass_name.data == NULL) {
        conf->pass_name = prev->pass_name;
    }

    if (conf->redis == NULL) {
        conf->redis = prev->redis;
    }

    cscf = ngx_mail_conf_get_module_srv_conf(cf, ngx_mail_core_module);

    if (cscf->protocol != &ngx_mail_smtp_ext_protocol) {
        return NGX_CONF_OK;
    }

    if (conf->max_recipients == 0) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"smtp_ext_max_recipients\" must be at least 1 "
                      "in %s:%ui", conf->file_name, conf->line);
        return NGX_CONF_ERROR;
    }

    if (conf->pass_name.data == NULL && conf->redis == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "no \"smtp_ext_pass\" or \"smtp_ext_redis\" is "
                      "defined for server in %s:%ui",
                      conf->file_name, conf->line);
        return NGX_CONF_ERROR;
    }

    if (conf->pass_name.data) {
        smcf = ngx_mail_conf_get_module_main_conf(cf,
                                                  ngx_mail_smtp_ext_module);

        conf->pass = ngx_mail_smtp_ext_find_pool(cf, smcf, &conf->pass_name);
        if (conf->pass == NULL) {
            return NGX_CONF_ERROR;
        }

        /* a PROXY protocol header belongs to one client's connection */

        if (conf->proxy_protocol && conf->pass->keepalive) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "\"keepalive\" in smtp_ext_upstream \"%V\" "
                          "cannot be used with \"smtp_ext_proxy_protocol "
                          "on\" in %s:%ui", &conf->pass->name,
                          conf->file_name, conf->line);
            return NGX_CONF_ERROR;
        }
    }

    if (conf->auth_methods && conf->redis == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"smtp_ext_auth\" needs \"smtp_ext_redis\" "
                      "in %s:%ui", conf->file_name, conf->line);
        return NGX_CONF_ERROR;
    }

    if (conf->require_auth && conf->auth_methods == 0) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"smtp_ext_require_auth\" needs \"smtp_ext_auth\" "
                      "in %s:%ui", conf->file_name, conf->line);
        return NGX_CONF_ERROR;
    }

    if (conf->auth_methods) {
        /* slow password hashes are checked off the event loop */

        if (ngx_mail_smtp_ext_passwd_thread_pool(cf, &conf->thread_pool)
            != NGX_CONF_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    /* edge protection, SPEC §10 */

    if (ngx_mail_smtp_ext_edge_merge_conf(cf, prev, conf) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

#if (NGX_MAIL_SSL)
    if (conf->upstream_tls != NGX_MAIL_SMTP_EXT_TLS_OFF) {
        if (ngx_mail_smtp_ext_upstream_ssl(cf, conf) != NGX_CONF_OK) {
            return NGX_CONF_ERROR;
        }
    }
#else
    if (conf->upstream_tls != NGX_MAIL_SMTP_EXT_TLS_OFF) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"smtp_ext_upstream_tls\" needs nginx built "
                      "--with-mail_ssl_module");
        return NGX_CONF_ERROR;
    }
#endif

    return ngx_mail_smtp_ext_build_replies(cf, conf);
}


static char *
ngx_mail_smtp_ext_build_replies(ngx_conf_t *cf,
    ngx_mail_smtp_ext_srv_conf_t *conf)
{
    u_char                    *p;
    size_t                     len, caps_len;
    ngx_uint_t                 starttls;
    ngx_mail_core_srv_conf_t  *cscf;
#if (NGX_MAIL_SSL)
    ngx_mail_ssl_conf_t       *sslcf;
#endif
    ngx_uint_t                 only;
    u_char                     caps[NGX_OFF_T_LEN + 160];
    u_char                     auth[64];
    size_t                     auth_len;

    cscf = ngx_mail_conf_get_module_srv_conf(cf, ngx_mail_core_module);

    starttls = 0;
    only = 0;

#if (NGX_MAIL_SSL)
    sslcf = ngx_mail_conf_get_module_srv_conf(cf, ngx_mail_ssl_module);
    starttls = (sslcf->starttls != NGX_MAIL_STARTTLS_OFF);
    only = (sslcf->starttls == NGX_MAIL_STARTTLS_ONLY);
#endif

    /* "250-AUTH ..." */

    p = auth;

    if (conf->auth_methods) {
        p = ngx_cpymem(p, "250-AUTH", sizeof("250-AUTH") - 1);

        if (conf->auth_methods & NGX_MAIL_SMTP_EXT_AUTH_PLAIN) {
            p = ngx_cpymem(p, " PLAIN", sizeof(" PLAIN") - 1);
        }

        if (conf->auth_methods & NGX_MAIL_SMTP_EXT_AUTH_LOGIN) {
            p = ngx_cpymem(p, " LOGIN", sizeof(" LOGIN") - 1);
        }

        if (conf->auth_methods & NGX_MAIL_SMTP_EXT_AUTH_CRAM_MD5) {
            p = ngx_cpymem(p, " CRAM-MD5", sizeof(" CRAM-MD5") - 1);
        }

        *p++ = CR; *p++ = LF;
    }

    auth_len = p - auth;

    /* "220 name ESMTP" */

    len = sizeof("220  ESMTP" CRLF) - 1 + cscf->server_name.len;
    p = ngx_pnalloc(cf->pool, len);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    conf->greeting.data = p;
    p = ngx_sprintf(p, "220 %V ESMTP" CRLF, &cscf->server_name);
    conf->greeting.len = p - conf->greeting.data;

    len = sizeof("250 " CRLF) - 1 + cscf->server_name.len;
    p = ngx_pnalloc(cf->pool, len);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    conf->helo.data = p;
    p = ngx_sprintf(p, "250 %V" CRLF, &cscf->server_name);
    conf->helo.len = p - conf->helo.data;

    p = ngx_sprintf(caps,
                    "250-PIPELINING" CRLF
                    "250-SIZE %O" CRLF
                    "250-8BITMIME" CRLF
                    "250-ENHANCEDSTATUSCODES" CRLF
                    "250-SMTPUTF8" CRLF
                    "%s%s",
                    conf->max_message_size,
                    conf->dsn ? "250-DSN" CRLF : "",
                    conf->chunking ? "250-CHUNKING" CRLF : "");

    caps_len = p - caps;

    len = sizeof("250-" CRLF) - 1 + cscf->server_name.len + caps_len
          + sizeof("250-STARTTLS" CRLF "250 HELP" CRLF) - 1 + auth_len;

    p = ngx_pnalloc(cf->pool, 2 * len);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    conf->ehlo.data = p;
    p = ngx_sprintf(p, "250-%V" CRLF "%*s%*s250 HELP" CRLF,
                    &cscf->server_name, caps_len, caps, auth_len, auth);
    conf->ehlo.len = p - conf->ehlo.data;

    if (starttls) {
        conf->ehlo_starttls.data = p;
        /* with "starttls only" AUTH is offered after STARTTLS only */

        p = ngx_sprintf(p, "250-%V" CRLF "%*s250-STARTTLS" CRLF "%*s"
                        "250 HELP" CRLF, &cscf->server_name, caps_len, caps,
                        only ? (size_t) 0 : auth_len, auth);
        conf->ehlo_starttls.len = p - conf->ehlo_starttls.data;

    } else {
        conf->ehlo_starttls = conf->ehlo;
    }

    len = sizeof("421 4.7.0  Too many errors" CRLF) - 1
          + sizeof("421 4.4.2  Timeout exceeded" CRLF) - 1
          + 2 * cscf->server_name.len;
    p = ngx_pnalloc(cf->pool, len);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    conf->too_many_errors.data = p;
    p = ngx_sprintf(p, "421 4.7.0 %V Too many errors" CRLF,
                    &cscf->server_name);
    conf->too_many_errors.len = p - conf->too_many_errors.data;

    conf->timed_out.data = p;
    p = ngx_sprintf(p, "421 4.4.2 %V Timeout exceeded" CRLF,
                    &cscf->server_name);
    conf->timed_out.len = p - conf->timed_out.data;

    /*
     * The reply buffer holds the longest reply of our own (EHLO) with room
     * to spare for pipelined short ones; longer backend replies are cut.
     */

    conf->max_reply = ngx_max(conf->ehlo.len, conf->ehlo_starttls.len);
    conf->max_reply = ngx_max(conf->max_reply, 128);
    conf->out_size = ngx_max(conf->max_reply + 128, 512);

    return NGX_CONF_OK;
}


#if (NGX_MAIL_SSL)

static char *
ngx_mail_smtp_ext_upstream_ssl(ngx_conf_t *cf,
    ngx_mail_smtp_ext_srv_conf_t *conf)
{
    /* the smtp_ext_upstream_tls_* settings, in their own file */

    return ngx_mail_smtp_ext_upstream_tls_conf(cf, conf);
}

#endif


static char *
ngx_mail_smtp_ext_pass(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_mail_smtp_ext_srv_conf_t *sscf = conf;

    ngx_str_t  *value;

    if (sscf->pass_name.data) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (value[1].len == 0) {
        return "has an empty target";
    }

    sscf->pass_name = value[1];

    return NGX_CONF_OK;
}


static char *
ngx_mail_smtp_ext_auth_methods_set(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_mail_smtp_ext_srv_conf_t *sscf = conf;

    ngx_str_t   *value;
    ngx_uint_t   i, m;

    if (sscf->auth_methods != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    /* "off" is 0, set: a server can turn off what mail {} offers */

    sscf->auth_methods = 0;

    value = cf->args->elts;

    if (cf->args->nelts == 2
        && ngx_strcmp(value[1].data, "off") == 0)
    {
        return NGX_CONF_OK;
    }

    for (i = 1; i < cf->args->nelts; i++) {

        for (m = 0; ngx_mail_smtp_ext_auth_methods[m].name.len; m++) {
            if (ngx_strcasecmp(ngx_mail_smtp_ext_auth_methods[m].name.data,
                               value[i].data)
                == 0)
            {
                sscf->auth_methods |= ngx_mail_smtp_ext_auth_methods[m].mask;
                break;
            }
        }

        if (ngx_mail_smtp_ext_auth_methods[m].name.len == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid authentication mechanism \"%V\", "
                               "expected plain, login, cram-md5 or off",
                               &value[i]);
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;
}


static char *
ngx_mail_smtp_ext_auth_fail_limit(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_mail_smtp_ext_srv_conf_t *sscf = conf;

    ngx_int_t   n;
    ngx_str_t  *value, s;

    if (sscf->auth_fail_limit != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;

    n = ngx_atoi(value[1].data, value[1].len);
    if (n == NGX_ERROR || n == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid limit \"%V\", expected a positive number",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    sscf->auth_fail_limit = n;

    if (cf->args->nelts == 3) {

        if (ngx_strncmp(value[2].data, "window=", 7) != 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\", expected window=T",
                               &value[2]);
            return NGX_CONF_ERROR;
        }

        s.data = value[2].data + 7;
        s.len = value[2].len - 7;

        sscf->auth_fail_window = ngx_parse_time(&s, 1);
        if (sscf->auth_fail_window == (time_t) NGX_ERROR
            || sscf->auth_fail_window == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid window \"%V\"", &value[2]);
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;
}


static char *
ngx_mail_smtp_ext_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_mail_smtp_ext_srv_conf_t *sscf = conf;

    ngx_mail_smtp_ext_main_conf_t  *smcf;

    if (sscf->redis) {
        return "is duplicate";
    }

    smcf = ngx_mail_conf_get_module_main_conf(cf, ngx_mail_smtp_ext_module);

    return ngx_mail_smtp_ext_redis_parse(cf, &smcf->redis, &sscf->redis);
}


static char *
ngx_mail_smtp_ext_redis_sentinel(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_mail_smtp_ext_main_conf_t *smcf = conf;

    return ngx_mail_smtp_ext_redis_sentinel_parse(cf, &smcf->redis_sentinels);
}


/* once per start and per reload, in the master: which build is running */

static ngx_int_t
ngx_mail_smtp_ext_init_module(ngx_cycle_t *cycle)
{
    ngx_mail_conf_ctx_t            *ctx;
    ngx_mail_smtp_ext_main_conf_t  *smcf;

    ngx_log_error(NGX_LOG_NOTICE, cycle->log, 0, NGX_MAIL_SMTP_EXT_VER);

    /* past the last point where a reload can fail */

    ctx = (ngx_mail_conf_ctx_t *) cycle->conf_ctx[ngx_mail_module.index];

    if (ctx == NULL
        || ngx_mail_smtp_ext_module.ctx_index == NGX_MODULE_UNSET_INDEX)
    {
        return NGX_OK;
    }

    smcf = ctx->main_conf[ngx_mail_smtp_ext_module.ctx_index];

    if (smcf) {
        ngx_mail_smtp_ext_cache_init_module(smcf);
    }

    return NGX_OK;
}


static ngx_int_t
ngx_mail_smtp_ext_init_process(ngx_cycle_t *cycle)
{
    ngx_mail_conf_ctx_t            *ctx;
    ngx_mail_smtp_ext_main_conf_t  *smcf;

    if (ngx_mail_smtp_ext_metrics_init_process(cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    ctx = (ngx_mail_conf_ctx_t *) cycle->conf_ctx[ngx_mail_module.index];

    if (ctx == NULL
        || ngx_mail_smtp_ext_module.ctx_index == NGX_MODULE_UNSET_INDEX)
    {
        return NGX_OK;
    }

    smcf = ctx->main_conf[ngx_mail_smtp_ext_module.ctx_index];

    if (smcf == NULL) {
        return NGX_OK;
    }

    ngx_mail_smtp_ext_upstream_init_process(smcf);

    if (ngx_mail_smtp_ext_health_init_process(cycle, smcf) != NGX_OK) {
        return NGX_ERROR;
    }

    if (smcf->redis.nelts == 0) {
        return NGX_OK;
    }

    return ngx_mail_smtp_ext_redis_init_process(cycle, &smcf->redis);
}


static void
ngx_mail_smtp_ext_exit_process(ngx_cycle_t *cycle)
{
    ngx_mail_smtp_ext_metrics_exit_process(cycle);
    ngx_mail_smtp_ext_redis_exit_process(cycle);
}
