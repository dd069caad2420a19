//! Certificates for TLS tests, made with the `openssl` command (Debian's
//! `openssl`): a CA, and server and client certificates it signs, valid for
//! 127.0.0.1 and localhost.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A CA and the certificates it signed, as PEM files in one directory.
pub struct Certs {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs (apt-get install openssl; tests/run.sh installs it)");
    assert!(output.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

impl Certs {
    /// A new CA named `name` in `dir/name/`, with a server and a client certificate.
    pub fn generate(dir: &Path, name: &str) -> Self {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).expect("a certificate directory");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let subject = format!("/CN={name}");
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", &subject]);
        ca.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        openssl(&dir, &ca);
        for (role, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
            let extensions = format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
            );
            std::fs::write(dir.join(format!("{role}.ext")), extensions).expect("an extensions file");
            let (key, csr, pem, ext) =
                (format!("{role}.key"), format!("{role}.csr"), format!("{role}.pem"), format!("{role}.ext"));
            let subject = format!("/CN=sluice-test-{role}");
            let mut request = vec!["req"];
            request.extend(ec);
            request.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
            openssl(&dir, &request);
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &pem,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ],
            );
        }
        Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            dir,
        }
    }
}

/// Replaces `to` with a copy of `from` in one rename, as a certificate
/// rotation does (a reader never sees half a file).
pub fn replace_file(from: &Path, to: &Path) {
    let temporary = to.with_extension("rotating");
    std::fs::copy(from, &temporary).expect("copy the new file");
    std::fs::rename(&temporary, to).expect("rename it into place");
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}
