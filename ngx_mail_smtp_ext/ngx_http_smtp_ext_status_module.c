
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


/*
 * SPEC 9: "smtp_ext_status;" in an http location prints the mail
 * module's counters in the Prometheus text format.  It lives in the same
 * .so as the mail module and reads the zone that module keeps
 * (ngx_mail_smtp_ext_metrics.c); no mail headers here.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>


typedef struct {
    ngx_shm_zone_t  *zone;
} ngx_http_smtp_ext_status_loc_conf_t;


static void *ngx_http_smtp_ext_status_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_smtp_ext_status(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_smtp_ext_status_handler(ngx_http_request_t *r);


/* ngx_mail_smtp_ext_metrics.c */
ngx_shm_zone_t *ngx_mail_smtp_ext_metrics_zone(ngx_conf_t *cf);
ngx_int_t ngx_mail_smtp_ext_metrics_render(ngx_shm_zone_t *zone,
    ngx_pool_t *pool, ngx_chain_t **out, off_t *len);


static ngx_command_t  ngx_http_smtp_ext_status_commands[] = {

    { ngx_string("smtp_ext_status"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_smtp_ext_status,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_smtp_ext_status_module_ctx = {
    NULL,                                   /* preconfiguration */
    NULL,                                   /* postconfiguration */

    NULL,                                   /* create main configuration */
    NULL,                                   /* init main configuration */

    NULL,                                   /* create server configuration */
    NULL,                                   /* merge server configuration */

    ngx_http_smtp_ext_status_create_loc_conf, /* create location conf */
    NULL                                    /* merge location conf */
};


ngx_module_t  ngx_http_smtp_ext_status_module = {
    NGX_MODULE_V1,
    &ngx_http_smtp_ext_status_module_ctx,   /* module context */
    ngx_http_smtp_ext_status_commands,      /* module directives */
    NGX_HTTP_MODULE,                        /* module type */
    NULL,                                   /* init master */
    NULL,                                   /* init module */
    NULL,                                   /* init process */
    NULL,                                   /* init thread */
    NULL,                                   /* exit thread */
    NULL,                                   /* exit process */
    NULL,                                   /* exit master */
    NGX_MODULE_V1_PADDING
};


static void *
ngx_http_smtp_ext_status_create_loc_conf(ngx_conf_t *cf)
{
    return ngx_pcalloc(cf->pool, sizeof(ngx_http_smtp_ext_status_loc_conf_t));
}


static char *
ngx_http_smtp_ext_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_smtp_ext_status_loc_conf_t *slcf = conf;

    ngx_http_core_loc_conf_t  *clcf;

    if (slcf->zone) {
        return "is duplicate";
    }

    /* the mail module's zone, added here too if http{} comes first */

    slcf->zone = ngx_mail_smtp_ext_metrics_zone(cf);
    if (slcf->zone == NULL) {
        return NGX_CONF_ERROR;
    }

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_smtp_ext_status_handler;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_smtp_ext_status_handler(ngx_http_request_t *r)
{
    off_t                                 len;
    ngx_int_t                             rc;
    ngx_chain_t                          *out;
    ngx_http_smtp_ext_status_loc_conf_t  *slcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    slcf = ngx_http_get_module_loc_conf(r, ngx_http_smtp_ext_status_module);

    if (ngx_mail_smtp_ext_metrics_render(slcf->zone, r->pool, &out, &len)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = len;
    ngx_str_set(&r->headers_out.content_type,
                "text/plain; version=0.0.4");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    return ngx_http_output_filter(r, out);
}
