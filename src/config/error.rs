//! Configuration errors: one [`ConfigError`] per problem, each naming the field it is about.

use std::fmt;

/// One problem found in a configuration file.
///
/// `field` is the path of the offending key as written in the file, e.g. `clusters[1].serve_url`,
/// `probe.interval` or `shards[0].name`. Two sentinel values are used for problems that are not about
/// a single key: `<file>` (the file could not be read) and `<yaml>` (the document is not valid YAML,
/// or its top level is not a mapping); their messages carry the line and column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// Path of the offending key, e.g. `clusters[1].serve_url`, or `<file>` / `<yaml>`.
    pub field: String,
    /// What is wrong, in words meant for the person editing the file.
    pub message: String,
}

impl ConfigError {
    /// Builds an error for `field` with `message`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Every problem found in a configuration file, in file order (never empty when returned as an error).
///
/// Displays as one `field: message` line per problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", Lines(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        ConfigErrors(vec![error])
    }
}

/// Displays errors one per line, without a trailing newline.
struct Lines<'a>(&'a [ConfigError]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}
