// Internal: a job's security settings at run time (docs/comm.md "TLS"):
// which credentials a process uses, where its secret comes from, and the
// credentials `archipelago train` writes for a run that asks for TLS
// without naming any.
#pragma once

#include <string>

#include "archipelago/comm/tls.h"
#include "archipelago/core/config.h"
#include "archipelago/core/status.h"

namespace archipelago::runtime {

// The files of security.credentials ({} when it is not set).
comm::TlsFiles tlsFilesOf(const core::JobConfig& job);

// What the coordinator link uses: the credentials with security.tls, else
// {} (plain). Every client of the coordinator (workers, the launcher's
// watch) and the coordinator itself ask this.
comm::TlsFiles coordinatorTlsOf(const core::JobConfig& job);

// Whether any link of the job is encrypted: security.tls, or a strait that
// says tls: true.
bool usesTls(const core::JobConfig& job);

// A worker's check before it connects: with TLS, security.credentials must
// name a directory whose certificate the CA in it signed. Errors name the
// field and the fix.
core::Status checkSecurity(const core::JobConfig& job);

// The job secret: ARCHIPELAGO_SECRET, else the file ARCHIPELAGO_SECRET_FILE
// names, else `credentials_dir`/secret when a directory is given. `who`
// ("every worker", "the coordinator") words the error.
core::Result<std::string> jobSecret(const std::string& credentials_dir, const std::string& who);

// `archipelago train`: a job that uses TLS without security.credentials gets
// fresh credentials in RUN_DIR/credentials (its own CA, verified like any
// other) and the field set to that directory; a relative directory becomes
// absolute (the workers read it from RUN_DIR/job.yaml).
core::Status provideCredentials(core::JobConfig& job);

}  // namespace archipelago::runtime
