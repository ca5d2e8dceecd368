//! The one TOML loader: the configuration file, the built-in defaults, a `rules_engine.dir`
//! file and a fleet document are all read here into the raw tree that `compile` checks.
//! Layer: config.

use std::path::Path;

/// Where TOML comes from.
#[derive(Clone, Copy)]
pub(crate) enum Toml<'a> {
    Text(&'a str),
    File(&'a Path),
}

/// Why the sources could not be read into a tree: a file unreadable, a TOML syntax error, an
/// environment override that does not fit. Its message is the `config` crate's, unchanged
/// (`check-config` prints it under the source's key).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub(crate) struct SourceError(#[from] config::ConfigError);

/// Read `sources` (each layered over the ones before it) and, with `env`, the `EDGEGATE__*`
/// environment overrides over them, into one raw tree.
pub(crate) fn read(sources: &[Toml<'_>], env: bool) -> Result<config::Value, SourceError> {
    let mut builder = config::Config::builder();
    for s in sources {
        builder = match *s {
            Toml::Text(t) => {
                builder.add_source(config::File::from_str(t, config::FileFormat::Toml))
            }
            Toml::File(p) => {
                builder.add_source(config::File::from(p).format(config::FileFormat::Toml))
            }
        };
    }
    if env {
        builder = builder.add_source(
            config::Environment::with_prefix("EDGEGATE")
                .prefix_separator("__")
                .separator("__"),
        );
    }
    builder
        .build()
        .and_then(|tree| tree.try_deserialize::<config::Value>())
        .map_err(SourceError)
}
