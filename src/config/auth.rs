//! Local broker passwords: a file of `username:$argon2id$...` lines (`broker.password_file`),
//! written by `edgegate passwd FILE USER`. Only PHC-format argon2 hashes are accepted: a plain
//! text password in the file is a configuration error, never a credential.
//!
//! Layer: config: loaded and checked when the configuration is compiled; the broker's guard and
//! the status page verify against it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// A problem in the text of a password file: names the line (and user), never a hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordFileError {
    #[error("line {0}: expected username:$argon2id$...")]
    Syntax(usize),
    #[error("line {0}: empty user name")]
    EmptyUser(usize),
    #[error("line {line} (user {user:?}): not an argon2 hash; create entries with `edgegate passwd FILE USER`")]
    NotArgon2 { line: usize, user: String },
    #[error("line {line}: user {user:?} appears twice")]
    Duplicate { line: usize, user: String },
}

/// Why a password file could not be loaded or written, or a password hashed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", .path.display())]
    Invalid {
        path: PathBuf,
        source: PasswordFileError,
    },
    #[error("user name {0:?} must be non-empty and contain no ':'")]
    BadUser(String),
    #[error("reading the password from standard input: {0}")]
    Input(std::io::Error),
    #[error("empty password on standard input")]
    EmptyPassword,
    #[error("{0}")]
    Hash(argon2::password_hash::Error),
}

impl AuthError {
    /// A mistake in how `edgegate passwd` was called (its user name or standard input), not
    /// in the file.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            AuthError::BadUser(_) | AuthError::Input(_) | AuthError::EmptyPassword
        )
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuthError + '_ {
        move |source| AuthError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn invalid(path: &Path) -> impl FnOnce(PasswordFileError) -> AuthError + '_ {
        move |source| AuthError::Invalid {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Parsed password file: user name -> PHC hash string.
#[derive(Clone, PartialEq, Eq)]
pub struct Passwords {
    users: HashMap<String, String>,
}

/// Never print hashes (they are secrets too: offline guessing).
impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Passwords({} users)", self.users.len())
    }
}

impl Passwords {
    /// Parse the text of a password file. Errors name the line, never its content.
    pub fn parse(text: &str) -> Result<Passwords, PasswordFileError> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let n = i + 1;
            let Some((user, hash)) = line.split_once(':') else {
                return Err(PasswordFileError::Syntax(n));
            };
            if user.is_empty() {
                return Err(PasswordFileError::EmptyUser(n));
            }
            match PasswordHash::new(hash) {
                Ok(h) if h.algorithm.as_str().starts_with("argon2") => {}
                _ => {
                    return Err(PasswordFileError::NotArgon2 {
                        line: n,
                        user: user.to_string(),
                    })
                }
            }
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(PasswordFileError::Duplicate {
                    line: n,
                    user: user.to_string(),
                });
            }
        }
        Ok(Passwords { users })
    }

    pub fn load(path: &Path) -> Result<Passwords, AuthError> {
        let text = std::fs::read_to_string(path).map_err(AuthError::io(path))?;
        Self::parse(&text).map_err(AuthError::invalid(path))
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Check `password` for `user`. CPU-heavy (argon2): call from a blocking thread. An unknown
    /// user costs the same as a wrong password, so user names cannot be probed by timing.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        let (hash, known) = match self.users.get(user) {
            Some(h) => (h.as_str(), true),
            None => (dummy_hash(), false),
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        let ok = Argon2::default().verify_password(password, &parsed).is_ok();
        ok && known
    }
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_password(b"edgegate-dummy").unwrap_or_default())
}

/// A new argon2id hash (PHC string) of `password` with a random salt and the crate's default
/// parameters (19 MiB, 2 passes).
pub fn hash_password(password: &[u8]) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut salt[..]);
    let salt = SaltString::encode_b64(&salt).map_err(AuthError::Hash)?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(AuthError::Hash)
}

/// `edgegate passwd FILE USER`: set USER's password (read from `input`, first line) in FILE,
/// creating the file (mode 0600) if needed and keeping other users' lines.
pub fn set_password(
    file: &Path,
    user: &str,
    input: &mut dyn std::io::BufRead,
) -> Result<(), AuthError> {
    if user.is_empty() || user.contains([':', '\n', '\r']) {
        return Err(AuthError::BadUser(user.to_string()));
    }
    let mut line = String::new();
    input.read_line(&mut line).map_err(AuthError::Input)?;
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(AuthError::EmptyPassword);
    }
    let hash = hash_password(password.as_bytes())?;
    let existing = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(AuthError::io(file)(e)),
    };
    let mut out = String::new();
    let mut replaced = false;
    for l in existing.lines() {
        if l.split_once(':').map(|(u, _)| u.trim()) == Some(user) {
            if !replaced {
                out.push_str(&format!("{user}:{hash}\n"));
                replaced = true;
            }
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    if !replaced {
        out.push_str(&format!("{user}:{hash}\n"));
    }
    Passwords::parse(&out).map_err(AuthError::invalid(file))?;
    let tmp = file.with_extension("tmp");
    write_private(&tmp, out.as_bytes()).map_err(AuthError::io(&tmp))?;
    std::fs::rename(&tmp, file).map_err(AuthError::io(file))
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_verify_and_reject() {
        let h = hash_password(b"s3cret").unwrap();
        let p = Passwords::parse(&format!("# sensors\nalice:{h}\n\n")).unwrap();
        assert!(p.verify("alice", b"s3cret"));
        assert!(!p.verify("alice", b"wrong"));
        assert!(!p.verify("bob", b"s3cret"));
        assert!(!format!("{p:?}").contains("argon2"));
    }

    #[test]
    fn plain_text_and_garbage_are_errors_without_echoing_secrets() {
        let e = Passwords::parse("alice:hunter2\n").unwrap_err().to_string();
        assert!(e.contains("line 1") && !e.contains("hunter2"), "{e}");
        assert!(Passwords::parse("nocolon\n").is_err());
        assert!(Passwords::parse(":$argon2id$x\n").is_err());
    }

    #[test]
    fn set_password_creates_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("passwd");
        set_password(&f, "a", &mut "one\n".as_bytes()).unwrap();
        set_password(&f, "b", &mut "two\n".as_bytes()).unwrap();
        set_password(&f, "a", &mut "three\n".as_bytes()).unwrap();
        let p = Passwords::load(&f).unwrap();
        assert_eq!(p.len(), 2);
        assert!(p.verify("a", b"three") && !p.verify("a", b"one"));
        assert!(p.verify("b", b"two"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&f).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o077,
                0,
                "password file must not be readable by others"
            );
        }
        assert!(set_password(&f, "a", &mut "".as_bytes()).is_err_and(|e| e.is_usage()));
        assert!(set_password(&f, "x:y", &mut "p\n".as_bytes()).is_err_and(|e| e.is_usage()));
        // A file that cannot be written is not the caller's mistake (`edgegate passwd` exits
        // with CANTCREAT, not USAGE).
        let no_dir = dir.path().join("missing/passwd");
        assert!(!set_password(&no_dir, "a", &mut "p\n".as_bytes())
            .unwrap_err()
            .is_usage());
    }
}
