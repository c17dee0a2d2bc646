// archipelago secrets init DIR [--days N] [--force]: a job's TLS
// credentials and secret (archipelago/comm/tls.h, docs/comm.md "TLS").
#include <cstdio>

#include "archipelago/comm/tls.h"
#include "cli/commands.h"

namespace archipelago::cli {

void addSecretsCommands(CLI::App& app) {
  auto* secrets = app.add_subcommand("secrets", "TLS credentials and the secret of a job");
  secrets->require_subcommand(1);
  static std::string dir;
  static comm::CredentialOptions options;
  auto* init = secrets->add_subcommand(
      "init", "write a new CA, a certificate and key it signed, and a job secret into DIR (copy DIR to every host; "
              "set security.credentials: DIR and security.tls: true in the job)");
  init->add_option("dir", dir, "directory to write (created with mode 700)")->required();
  init->add_option("--days", options.days, "validity of the certificates in days")
      ->capture_default_str()
      ->check(CLI::Range(1, 36500));
  init->add_flag("--force", options.force, "replace the credentials already in DIR (every host needs the new ones)");
  setAction(init, [] {
    ARCH_RETURN_IF_ERROR(comm::writeCredentials(dir, options));
    const comm::TlsFiles f = comm::credentialFiles(dir);
    std::printf("wrote %s, %s, %s and %s/secret (valid %d days; the CA's private key is not kept)\n", f.ca.c_str(),
                f.cert.c_str(), f.key.c_str(), dir.c_str(), options.days);
    return core::okStatus();
  });
}

}  // namespace archipelago::cli
