//! One fleet document: size, encoding, signature and rules, checked before anything is applied.
//!
//! A document is the exact bytes of a retained MQTT message: a TOML file in the syntax of a
//! `rules_engine.dir` file (only `[[rules]]`). A signed document starts with one comment line
//!
//! ```text
//! #edgegate-signature: ed25519 <signed at, Unix milliseconds> <signature, base64>
//! ```
//!
//! followed by the body. The signature covers [`signed_message`]: a fixed context, the topic the
//! document is meant for, the signing time and the body; so a signed document cannot be moved to
//! another gateway's or group's topic, and (with the time) not replayed over a newer one. The
//! line is a TOML comment: the whole document is still a valid rules file.
//!
//! Layer: app (the rules are compiled by `config::rules`).

use crate::config::rules::EngineSettings;
use crate::config::{ConfigError, RuleConfig};

/// First characters of a signed document.
pub const SIGNATURE_TAG: &str = "#edgegate-signature: ed25519 ";

/// What a document must satisfy besides its rules.
#[derive(Debug, Clone)]
pub struct Policy {
    pub max_size: usize,
    /// With any key, only documents signed by one of them pass.
    pub trusted_keys: Vec<[u8; 32]>,
}

/// A document that passed every check.
#[derive(Debug, Clone)]
pub struct Checked {
    pub rules: Vec<RuleConfig>,
    pub sha256: String,
    /// Signing time (Unix ms) of a document whose signature was verified.
    pub signed_at: Option<u64>,
}

/// The signature line of a document, if it starts with one.
struct Signature {
    signed_at: u64,
    bytes: Vec<u8>,
    /// Where the body starts (after the line's newline).
    body: usize,
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// What a signature covers.
pub fn signed_message(topic: &str, signed_at: u64, body: &[u8]) -> Vec<u8> {
    let mut m = format!("edgegate-fleet-rules/1\n{topic}\n{signed_at}\n").into_bytes();
    m.extend_from_slice(body);
    m
}

fn error(key: &str, message: impl Into<String>) -> Vec<ConfigError> {
    vec![ConfigError {
        key: key.into(),
        message: message.into(),
    }]
}

fn parse_signature(payload: &[u8]) -> Result<Option<Signature>, Vec<ConfigError>> {
    use base64::Engine as _;
    if !payload.starts_with(SIGNATURE_TAG.as_bytes()) {
        return Ok(None);
    }
    let bad = || {
        error(
            "signature",
            "malformed signature line (expected `#edgegate-signature: ed25519 <unix ms> <base64>`)",
        )
    };
    let end = payload.iter().position(|b| *b == b'\n').ok_or_else(bad)?;
    let line = std::str::from_utf8(&payload[SIGNATURE_TAG.len()..end]).map_err(|_| bad())?;
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(at), Some(sig), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let signed_at = at.parse::<u64>().map_err(|_| bad())?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(sig)
        .map_err(|_| bad())?;
    Ok(Some(Signature {
        signed_at,
        bytes,
        body: end + 1,
    }))
}

/// Check a document received on `topic`: size, UTF-8, signature (when keys are trusted), then
/// the rules exactly as `check-config` checks a `rules_engine.dir` file. Every problem comes
/// with a key: `document`, `signature`, `toml` or the rule's own (`rules[0].match`).
pub fn check(
    topic: &str,
    payload: &[u8],
    policy: &Policy,
    settings: &EngineSettings,
) -> Result<Checked, Vec<ConfigError>> {
    if payload.len() > policy.max_size {
        return Err(error(
            "document",
            format!(
                "{} bytes, larger than fleet.max_document_size ({} bytes)",
                payload.len(),
                policy.max_size
            ),
        ));
    }
    let text = std::str::from_utf8(payload).map_err(|e| {
        error(
            "document",
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.valid_up_to()
            ),
        )
    })?;
    let signature = parse_signature(payload)?;
    let signed_at = if policy.trusted_keys.is_empty() {
        None
    } else {
        let Some(sig) = signature else {
            return Err(error(
                "signature",
                "fleet.trusted_keys is set and the document is not signed",
            ));
        };
        let message = signed_message(topic, sig.signed_at, &payload[sig.body..]);
        let valid = policy.trusted_keys.iter().any(|k| {
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, k)
                .verify(&message, &sig.bytes)
                .is_ok()
        });
        if !valid {
            return Err(error(
                "signature",
                format!("no key of fleet.trusted_keys signed this document for {topic}"),
            ));
        }
        Some(sig.signed_at)
    };
    let rules = crate::config::rules::compile_document(text, settings).map_err(|e| e.0)?;
    Ok(Checked {
        rules,
        sha256: sha256_hex(payload),
        signed_at,
    })
}

/// A seed that does not make an ed25519 key pair.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not an ed25519 key: {0}")]
    NotEd25519(ring::error::KeyRejected),
    #[error("unexpected key length")]
    Length,
}

/// Sign `body` for `topic` with the ed25519 key whose 32-byte seed is `seed`: the document to
/// publish (signature line + body). A signature line already at the start of `body` is
/// replaced.
pub fn sign(
    seed: &[u8; 32],
    topic: &str,
    body: &[u8],
    signed_at: u64,
) -> Result<Vec<u8>, KeyError> {
    use base64::Engine as _;
    let body = match parse_signature(body) {
        Ok(Some(s)) => &body[s.body..],
        _ => body,
    };
    let pair =
        ring::signature::Ed25519KeyPair::from_seed_unchecked(seed).map_err(KeyError::NotEd25519)?;
    let sig = pair.sign(&signed_message(topic, signed_at, body));
    let mut out = format!(
        "{SIGNATURE_TAG}{signed_at} {}\n",
        base64::engine::general_purpose::STANDARD.encode(sig.as_ref())
    )
    .into_bytes();
    out.extend_from_slice(body);
    Ok(out)
}

/// The public key of a seed.
pub fn public_key(seed: &[u8; 32]) -> Result<[u8; 32], KeyError> {
    use ring::signature::KeyPair as _;
    let pair =
        ring::signature::Ed25519KeyPair::from_seed_unchecked(seed).map_err(KeyError::NotEd25519)?;
    <[u8; 32]>::try_from(pair.public_key().as_ref()).map_err(|_| KeyError::Length)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "[[rules]]\nname = \"hot\"\nmatch = \"sensors/+/temp\"\nwhen = \"value > 30\"\naction = \"forward\"\n";

    fn policy(keys: Vec<[u8; 32]>) -> Policy {
        Policy {
            max_size: 4096,
            trusted_keys: keys,
        }
    }

    fn keys(errors: &[ConfigError]) -> Vec<&str> {
        errors.iter().map(|e| e.key.as_str()).collect()
    }

    #[test]
    fn a_valid_document_passes_with_its_hash() {
        let c = check("t", DOC.as_bytes(), &policy(vec![]), &Default::default()).unwrap();
        assert_eq!(c.rules.len(), 1);
        assert_eq!(c.sha256, sha256_hex(DOC.as_bytes()));
        assert_eq!(c.sha256.len(), 64);
    }

    #[test]
    fn every_problem_has_a_key() {
        let p = policy(vec![]);
        let s = EngineSettings::default();
        let e = check("t", &[0xff, 0xfe, b'x'], &p, &s).unwrap_err();
        assert_eq!(keys(&e), ["document"]);
        let e = check("t", &vec![b'#'; 5000], &p, &s).unwrap_err();
        assert_eq!(keys(&e), ["document"]);
        let e = check("t", b"[[rules]\nname=", &p, &s).unwrap_err();
        assert_eq!(keys(&e), ["toml"]);
        let bad = "[[rules]]\nname = \"a\"\nmatch = \"x/#/y\"\n[[rules]]\nname = \"b\"\nmatch = \"x\"\nwhen = \"value >\"\n[rules_engine]\ntick = \"1s\"\n";
        let e = check("t", bad.as_bytes(), &p, &s).unwrap_err();
        let k = keys(&e);
        assert!(k.contains(&"rules[0].match"), "{e:?}");
        assert!(k.contains(&"rules[1].when"), "{e:?}");
        assert!(
            k.contains(&"rules_engine"),
            "a document cannot change engine settings: {e:?}"
        );
        let dup = format!("{DOC}{DOC}");
        let e = check("t", dup.as_bytes(), &p, &s).unwrap_err();
        assert_eq!(keys(&e), ["rules[1].name"]);
    }

    #[test]
    fn signatures_bind_key_topic_and_body() {
        let seed = [7u8; 32];
        let other = [8u8; 32];
        let pk = public_key(&seed).unwrap();
        let s = EngineSettings::default();
        let signed = sign(&seed, "edge/a/config/rules", DOC.as_bytes(), 1000).unwrap();
        let ok = check("edge/a/config/rules", &signed, &policy(vec![pk]), &s).unwrap();
        assert_eq!(ok.signed_at, Some(1000));
        // Another topic, another key, a changed body, no signature: refused.
        let e = check("edge/b/config/rules", &signed, &policy(vec![pk]), &s).unwrap_err();
        assert_eq!(keys(&e), ["signature"]);
        let by_other = sign(&other, "edge/a/config/rules", DOC.as_bytes(), 1000).unwrap();
        let e = check("edge/a/config/rules", &by_other, &policy(vec![pk]), &s).unwrap_err();
        assert_eq!(keys(&e), ["signature"]);
        let mut changed = signed.clone();
        let n = changed.len();
        changed[n - 3] = b'X';
        let e = check("edge/a/config/rules", &changed, &policy(vec![pk]), &s).unwrap_err();
        assert_eq!(keys(&e), ["signature"]);
        let e = check("edge/a/config/rules", DOC.as_bytes(), &policy(vec![pk]), &s).unwrap_err();
        assert_eq!(keys(&e), ["signature"]);
        // Re-signing replaces the line instead of stacking a second one.
        let again = sign(&seed, "edge/a/config/rules", &signed, 2000).unwrap();
        assert_eq!(again.len(), signed.len());
        // Without trusted keys the line is a comment.
        assert!(check("x", &signed, &policy(vec![]), &s).is_ok());
    }
}
