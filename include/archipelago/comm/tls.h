// TLS credentials of a job (docs/comm.md "TLS"). Every TLS link is mutual:
// each end presents its certificate and accepts only a peer whose
// certificate the job's CA signed; on top of that, the HMAC handshake
// proves the job secret and is bound to the TLS channel. There is no mode
// that accepts any certificate.
//
// `archipelago secrets init DIR` writes one directory that every host of
// the job gets a copy of:
//   ca.pem     the job's CA certificate (the only trust anchor)
//   node.pem   a certificate the CA signed, shared by every process
//   node.key   its private key (mode 600)
//   secret     the job secret, 64 hex digits (mode 600)
// The CA's private key is not kept: nothing else is ever signed by it, so a
// stolen directory cannot mint credentials for another job. An operator who
// wants one certificate per host signs them with a CA of their own and puts
// the same three file names in each host's directory.
#pragma once

#include <string>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"

namespace archipelago::comm {

struct TlsFiles {
  std::string ca;    // PEM CA certificate(s) a peer's certificate must chain to
  std::string cert;  // PEM certificate this process presents (may hold its chain)
  std::string key;   // PEM private key of `cert`

  bool empty() const { return ca.empty() && cert.empty() && key.empty(); }
};

// The files of a credentials directory (they need not exist yet).
TlsFiles credentialFiles(const std::string& dir);

// kInvalidArgument naming `field` and the fix when a file is missing or
// unreadable, or when `key` does not belong to `cert`; also that `cert`
// chains to `ca`.
core::Status checkCredentials(const TlsFiles& files, const std::string& field);

// Whether a job encrypts any link: every link (`all_links`, the job's
// security.tls) or the links across a strait whose spec says tls: true.
bool jobUsesTls(bool all_links, const core::ClusterSpec& cluster);

// The credentials of a job that encrypts links: set, present and
// consistent (checkCredentials). `all_links` says why they are needed in
// the error, which names security.credentials and the fix.
core::Status requireJobCredentials(bool all_links, const TlsFiles& files);

struct CredentialOptions {
  int days = 365;      // validity of the CA and node certificates
  bool force = false;  // replace the files of an existing credentials directory
};

// Writes a fresh CA, a node certificate and key it signed, and a job secret
// into `dir` (created with mode 700). Refuses a directory that holds
// anything but credentials, and existing credentials unless `force`.
core::Status writeCredentials(const std::string& dir, const CredentialOptions& options = {});

// The job secret stored in `dir` (trailing whitespace dropped).
core::Result<std::string> readSecretFile(const std::string& path);

}  // namespace archipelago::comm
