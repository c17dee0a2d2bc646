#include "runtime/security.h"

#include <cstdlib>
#include <filesystem>

#include "archipelago/core/log.h"

namespace archipelago::runtime {

namespace fs = std::filesystem;

comm::TlsFiles tlsFilesOf(const core::JobConfig& job) {
  if (job.security.credentials.empty()) return {};
  return comm::credentialFiles(job.security.credentials);
}

comm::TlsFiles coordinatorTlsOf(const core::JobConfig& job) {
  return job.security.tls ? tlsFilesOf(job) : comm::TlsFiles{};
}

bool usesTls(const core::JobConfig& job) { return comm::jobUsesTls(job.security.tls, job.cluster); }

core::Status checkSecurity(const core::JobConfig& job) {
  return usesTls(job) ? comm::requireJobCredentials(job.security.tls, tlsFilesOf(job)) : core::okStatus();
}

core::Result<std::string> jobSecret(const std::string& credentials_dir, const std::string& who) {
  if (const char* s = std::getenv("ARCHIPELAGO_SECRET"); s && *s) return std::string(s);
  if (const char* f = std::getenv("ARCHIPELAGO_SECRET_FILE"); f && *f) {
    auto r = comm::readSecretFile(f);
    if (!r.isOk()) return r.status().withContext("ARCHIPELAGO_SECRET_FILE");
    return r;
  }
  if (!credentials_dir.empty()) {
    const std::string path = (fs::path(credentials_dir) / "secret").string();
    std::error_code ec;
    if (fs::exists(path, ec)) return comm::readSecretFile(path);
  }
  return core::invalidArgument("ARCHIPELAGO_SECRET is not set: " + who +
                               " needs the job's shared secret (set ARCHIPELAGO_SECRET or ARCHIPELAGO_SECRET_FILE, "
                               "or keep it as `secret` in the credentials directory from `archipelago secrets init`)");
}

core::Status provideCredentials(core::JobConfig& job) {
  if (!job.security.credentials.empty()) {
    // The workers read it from RUN_DIR/job.yaml, wherever they start.
    job.security.credentials = fs::absolute(job.security.credentials).string();
    return core::okStatus();
  }
  if (!usesTls(job)) return core::okStatus();
  const std::string dir = fs::absolute(fs::path(job.run_dir) / "credentials").string();
  std::error_code ec;
  if (!fs::exists(fs::path(dir) / "ca.pem", ec)) {
    comm::CredentialOptions o;
    ARCH_RETURN_IF_ERROR(comm::writeCredentials(dir, o).withContext("TLS credentials of this run"));
    ARCH_LOG_INFO("TLS: wrote a CA and credentials for this run in {} (security.credentials names your own)", dir);
  }
  job.security.credentials = dir;
  return checkSecurity(job);
}

}  // namespace archipelago::runtime
