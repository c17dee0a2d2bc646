// TLS credentials (archipelago/comm/tls.h) and the OpenSSL contexts made
// from them (comm/tls_context.h).
#include "archipelago/comm/tls.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <cerrno>

#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <tuple>

#include "archipelago/core/files.h"
#include "comm/tls_context.h"

namespace archipelago::comm {

namespace fs = std::filesystem;

namespace {

const char* const kCredentialNames[] = {"ca.pem", "node.pem", "node.key", "secret"};

struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;
using Cert = std::unique_ptr<X509, X509Free>;
using Bio = std::unique_ptr<BIO, BioFree>;

std::string hex(const unsigned char* p, size_t n) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    s += d[p[i] >> 4];
    s += d[p[i] & 15];
  }
  return s;
}

bool addExtension(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
  if (!ext) return false;
  const bool ok = X509_add_ext(cert, ext, -1) == 1;
  X509_EXTENSION_free(ext);
  return ok;
}

// A certificate for `key` named `cn`, signed by (issuer, issuer_key); the CA
// signs itself (issuer == nullptr).
core::Result<Cert> makeCertificate(EVP_PKEY* key, const char* cn, X509* issuer, EVP_PKEY* issuer_key, int days) {
  Cert cert(X509_new());
  if (!cert) return core::internalError("X509_new: " + sslError());
  X509_set_version(cert.get(), 2);
  unsigned char serial[16];
  if (RAND_bytes(serial, sizeof(serial)) != 1) return core::internalError("RAND_bytes: " + sslError());
  serial[0] &= 0x7f;  // a positive integer
  BIGNUM* bn = BN_bin2bn(serial, sizeof(serial), nullptr);
  BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert.get()));
  BN_free(bn);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);  // clocks of the hosts may differ a little
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), static_cast<long>(days) * 24 * 3600);
  X509_set_pubkey(cert.get(), key);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("archipelago"), -1, -1, 0);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn), -1, -1, 0);
  X509* signer = issuer ? issuer : cert.get();
  X509_set_issuer_name(cert.get(), X509_get_subject_name(signer));
  const bool is_ca = issuer == nullptr;
  bool ok = addExtension(cert.get(), signer, NID_basic_constraints, is_ca ? "critical,CA:TRUE,pathlen:0" : "critical,CA:FALSE") &&
            addExtension(cert.get(), signer, NID_key_usage,
                         is_ca ? "critical,keyCertSign,cRLSign" : "critical,digitalSignature") &&
            addExtension(cert.get(), signer, NID_subject_key_identifier, "hash");
  if (!is_ca) {
    ok = ok && addExtension(cert.get(), signer, NID_ext_key_usage, "serverAuth,clientAuth") &&
         addExtension(cert.get(), signer, NID_authority_key_identifier, "keyid:always");
  }
  if (!ok) return core::internalError("certificate extensions: " + sslError());
  if (X509_sign(cert.get(), issuer_key ? issuer_key : key, EVP_sha256()) == 0) {
    return core::internalError("X509_sign: " + sslError());
  }
  return cert;
}

std::string pemOf(X509* cert) {
  Bio b(BIO_new(BIO_s_mem()));
  PEM_write_bio_X509(b.get(), cert);
  char* data = nullptr;
  const long n = BIO_get_mem_data(b.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

std::string pemOf(EVP_PKEY* key) {
  Bio b(BIO_new(BIO_s_mem()));
  PEM_write_bio_PrivateKey(b.get(), key, nullptr, nullptr, 0, nullptr, nullptr);
  char* data = nullptr;
  const long n = BIO_get_mem_data(b.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

// What `dir` holds now: nothing, credentials only, or other files.
core::Result<bool> holdsCredentials(const fs::path& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) return false;
  if (!fs::is_directory(dir, ec)) {
    return core::invalidArgument(dir.string() + " is not a directory: give secrets init a directory to write");
  }
  const std::set<std::string> ours(std::begin(kCredentialNames), std::end(kCredentialNames));
  bool any = false;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (!ours.count(name)) {
      return core::invalidArgument(dir.string() + " holds " + name +
                                   ", which is not a credential file: secrets init only writes into an empty or "
                                   "credentials directory (give a new one)");
    }
    any = true;
  }
  return any;
}

core::Result<X509*> readCertificate(const std::string& path, const std::string& what) {
  Bio b(BIO_new_file(path.c_str(), "r"));
  if (!b) return core::invalidArgument(what + ": cannot read " + path);
  X509* x = PEM_read_bio_X509(b.get(), nullptr, nullptr, nullptr);
  if (!x) return core::invalidArgument(what + ": " + path + " holds no PEM certificate");
  return x;
}

}  // namespace

std::string sslError() {
  unsigned long e = ERR_get_error();
  if (e == 0) return "unknown TLS error";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  ERR_clear_error();
  return buf;
}

TlsFiles credentialFiles(const std::string& dir) {
  const fs::path d(dir);
  return {(d / "ca.pem").string(), (d / "node.pem").string(), (d / "node.key").string()};
}

core::Result<std::string> readSecretFile(const std::string& path) {
  ARCH_ASSIGN_OR_RETURN(std::string s, core::readFile(path));
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  if (s.empty()) return core::invalidArgument(path + " is empty: it should hold the job secret");
  return s;
}

core::Status writeCredentials(const std::string& dir, const CredentialOptions& o) {
  if (o.days < 1) return core::invalidArgument("--days must be at least 1 (got " + std::to_string(o.days) + ")");
  const fs::path final_dir = fs::absolute(dir);
  ARCH_ASSIGN_OR_RETURN(const bool exists, holdsCredentials(final_dir));
  if (exists && !o.force) {
    return core::failedPrecondition(final_dir.string() +
                               " already holds credentials: a job whose hosts have them keeps working only with "
                               "them; pass --force to replace them");
  }
  Pkey ca_key(EVP_EC_gen("P-256"));
  Pkey node_key(EVP_EC_gen("P-256"));
  if (!ca_key || !node_key) return core::internalError("key generation: " + sslError());
  ARCH_ASSIGN_OR_RETURN(Cert ca, makeCertificate(ca_key.get(), "archipelago job CA", nullptr, nullptr, o.days));
  ARCH_ASSIGN_OR_RETURN(Cert node, makeCertificate(node_key.get(), "archipelago node", ca.get(), ca_key.get(), o.days));
  unsigned char secret[32];
  if (RAND_bytes(secret, sizeof(secret)) != 1) return core::internalError("RAND_bytes: " + sslError());

  std::error_code ec;
  fs::create_directories(final_dir.parent_path(), ec);
  ARCH_ASSIGN_OR_RETURN(const fs::path tmp, core::makeSiblingTempDir(final_dir, ".tmp-"));
  ::chmod(tmp.c_str(), 0700);  // nobody else reads the key or the secret, not even while they are written
  const std::pair<const char*, std::string> files[] = {{"ca.pem", pemOf(ca.get())},
                                                       {"node.pem", pemOf(node.get())},
                                                       {"node.key", pemOf(node_key.get())},
                                                       {"secret", hex(secret, sizeof(secret)) + "\n"}};
  for (const auto& [name, bytes] : files) {
    const core::Status st = core::writeFile(tmp / name, bytes);
    if (!st.isOk()) {
      fs::remove_all(tmp, ec);
      return st;
    }
    ::chmod((tmp / name).c_str(), std::string(name).find(".pem") != std::string::npos ? 0644 : 0600);
  }
  return core::replaceDirectoryAtomic(tmp, final_dir);
}

bool jobUsesTls(bool all_links, const core::ClusterSpec& cluster) {
  if (all_links) return true;
  for (const auto& s : cluster.straits) {
    if (s.tls) return true;
  }
  return false;
}

core::Status requireJobCredentials(bool all_links, const TlsFiles& files) {
  if (files.empty()) {
    return core::invalidArgument(
        std::string(all_links ? "security.tls is on" : "a strait says tls: true") +
        " but security.credentials is empty: write the job's credentials with `archipelago secrets init DIR`, copy "
        "DIR to every host and set security.credentials: DIR");
  }
  return checkCredentials(files, "security.credentials");
}

core::Status checkCredentials(const TlsFiles& f, const std::string& field) {
  const std::string fix = " (write a credentials directory with `archipelago secrets init DIR` and point " + field +
                          " at it)";
  for (const std::string* p : {&f.ca, &f.cert, &f.key}) {
    std::error_code ec;
    if (p->empty() || !fs::is_regular_file(*p, ec)) {
      return core::invalidArgument(field + ": " + (p->empty() ? std::string("a TLS file is not set") : *p + " does not exist") + fix);
    }
  }
  ARCH_ASSIGN_OR_RETURN(X509 * ca_raw, readCertificate(f.ca, field));
  Cert ca(ca_raw);
  ARCH_ASSIGN_OR_RETURN(X509 * cert_raw, readCertificate(f.cert, field));
  Cert cert(cert_raw);
  Bio kb(BIO_new_file(f.key.c_str(), "r"));
  Pkey key(kb ? PEM_read_bio_PrivateKey(kb.get(), nullptr, nullptr, nullptr) : nullptr);
  if (!key) return core::invalidArgument(field + ": " + f.key + " holds no PEM private key" + fix);
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    ERR_clear_error();
    return core::invalidArgument(field + ": the key " + f.key + " does not belong to the certificate " + f.cert);
  }
  X509_STORE* store = X509_STORE_new();
  X509_STORE_add_cert(store, ca.get());
  X509_STORE_CTX* ctx = X509_STORE_CTX_new();
  X509_STORE_CTX_init(ctx, store, cert.get(), nullptr);
  const bool ok = X509_verify_cert(ctx) == 1;
  const std::string why = ok ? "" : X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx));
  X509_STORE_CTX_free(ctx);
  X509_STORE_free(store);
  ERR_clear_error();
  if (!ok) {
    return core::invalidArgument(field + ": the certificate " + f.cert + " is not signed by the CA " + f.ca + " (" +
                                 why + ")");
  }
  return core::okStatus();
}

namespace {

int writeNoSignal(BIO* b, const char* in, int n) {
  const int fd = static_cast<int>(BIO_get_fd(b, nullptr));
  const ssize_t k = ::send(fd, in, static_cast<size_t>(n), MSG_NOSIGNAL);
  BIO_clear_retry_flags(b);
  if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_write(b);
  return static_cast<int>(k);
}

}  // namespace

BIO* socketBio(int fd) {
  static BIO_METHOD* method = [] {
    const BIO_METHOD* sock = BIO_s_socket();
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR,
                                 "archipelago socket");
    BIO_meth_set_write(m, writeNoSignal);
    BIO_meth_set_read(m, BIO_meth_get_read(sock));
    BIO_meth_set_puts(m, BIO_meth_get_puts(sock));
    BIO_meth_set_ctrl(m, BIO_meth_get_ctrl(sock));
    BIO_meth_set_create(m, BIO_meth_get_create(sock));
    BIO_meth_set_destroy(m, BIO_meth_get_destroy(sock));
    return m;
  }();
  BIO* b = BIO_new(method);
  if (b) BIO_set_fd(b, fd, BIO_NOCLOSE);
  return b;
}

core::Result<SSL_CTX*> tlsContext(bool server, const TlsFiles& f) {
  if (f.ca.empty() || f.cert.empty() || f.key.empty()) {
    return core::invalidArgument("TLS needs the job's CA, certificate and key (security.credentials)");
  }
  static std::mutex mu;
  // Immortal (never destroyed, so still reachable at exit): sockets on
  // threads that outlive static destruction may still use a context.
  static auto* contexts = new std::map<std::tuple<bool, std::string, std::string, std::string>, SSL_CTX*>();
  std::lock_guard<std::mutex> lock(mu);
  SSL_CTX*& c = (*contexts)[{server, f.ca, f.cert, f.key}];
  if (c) return c;
  SSL_CTX* nc = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  if (!nc) return core::internalError("SSL_CTX_new: " + sslError());
  SSL_CTX_set_min_proto_version(nc, TLS1_3_VERSION);
  SSL_CTX_set_mode(nc, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  // Mutual: both ends present a certificate and accept only one the job's CA signed.
  SSL_CTX_set_verify(nc, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  if (SSL_CTX_load_verify_locations(nc, f.ca.c_str(), nullptr) != 1 ||
      SSL_CTX_use_certificate_chain_file(nc, f.cert.c_str()) != 1 ||
      SSL_CTX_use_PrivateKey_file(nc, f.key.c_str(), SSL_FILETYPE_PEM) != 1 || SSL_CTX_check_private_key(nc) != 1) {
    const std::string why = sslError();
    SSL_CTX_free(nc);
    return core::invalidArgument("TLS credentials (CA " + f.ca + ", certificate " + f.cert + ", key " + f.key +
                                 "): " + why);
  }
  c = nc;
  return c;
}

core::Status tlsError(const std::string& what, SSL* ssl) {
  const std::string fix = "; both ends need credentials from the same `archipelago secrets init`";
  const long v = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;
  const unsigned long e = ERR_peek_error();
  const std::string why = sslError();
  if (v != X509_V_OK) {
    return core::permissionDenied(what + ": the peer's certificate failed verification against this job's CA: " +
                                  X509_verify_cert_error_string(v) + fix);
  }
  if (ERR_GET_LIB(e) == ERR_LIB_SSL) {
    switch (ERR_GET_REASON(e)) {
      case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
      case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
      case SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN:
      case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
      case SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
      case SSL_R_CERTIFICATE_VERIFY_FAILED:
        return core::permissionDenied(what + ": the certificates were refused (" + why + ")" + fix);
      default:
        break;
    }
  }
  if (e == 0) {
    // In the handshake a close is most likely an end without credentials;
    // later it is a lost peer, which the failure handling expects as such.
    const bool handshake = ssl == nullptr || SSL_is_init_finished(ssl) == 0;
    return core::unavailable(what + ": the connection closed" +
                             (handshake ? " (the other end may have no TLS credentials: security.credentials, "
                                          "coordinator --credentials)"
                                        : ""));
  }
  return core::unavailable(what + ": " + why);
}

}  // namespace archipelago::comm
