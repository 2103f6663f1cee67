
/*
 * Copyright (C) ngx_mail_smtp_ext developers
 */


#ifndef _NGX_MAIL_SMTP_EXT_VERSION_H_INCLUDED_
#define _NGX_MAIL_SMTP_EXT_VERSION_H_INCLUDED_


/* semantic versioning (MAJOR.MINOR.PATCH); CHANGES and debian/changelog
 * carry the same number */

#define NGX_MAIL_SMTP_EXT_VERSION      "0.2.0"
#define NGX_MAIL_SMTP_EXT_VER          "ngx_mail_smtp_ext/"                   \
                                       NGX_MAIL_SMTP_EXT_VERSION


#endif /* _NGX_MAIL_SMTP_EXT_VERSION_H_INCLUDED_ */
