// Internal: OpenSSL contexts made from a job's credentials
// (archipelago/comm/tls.h), one per (role, files), kept for the process's
// lifetime; and the words for an OpenSSL failure.
#pragma once

#include <string>

#include "archipelago/comm/tls.h"
#include "archipelago/core/status.h"

typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;
typedef struct bio_st BIO;

namespace archipelago::comm {

// TLS 1.3 only, mutual: presents files.cert and verifies the peer against
// files.ca. kInvalidArgument naming the files when they do not load.
core::Result<SSL_CTX*> tlsContext(bool server, const TlsFiles& files);

// A BIO over the (non-blocking) socket `fd` that writes with MSG_NOSIGNAL:
// OpenSSL's own socket BIO write()s, and a write to a peer that has gone
// raises SIGPIPE, which kills the process. The fd stays the caller's.
BIO* socketBio(int fd);

// The oldest queued OpenSSL error as text (clears the queue).
std::string sslError();

// The status of a failed TLS handshake, read or write on `ssl` (`what`:
// "TLS handshake", ...). kPermissionDenied when a certificate was refused,
// by this end (verification against the job's CA, in words) or by the peer
// (its alert: unknown CA, no certificate, ...): waiting cannot fix that.
// Otherwise kUnavailable (a lost connection).
core::Status tlsError(const std::string& what, SSL* ssl);

}  // namespace archipelago::comm
