//! Errors in configuration resources, named by field.

/// Why one resource was refused: the field (a path such as
/// `spec.rules[0].to[0].operation.paths[1]`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A resource's `metadata`. Only the name and namespace matter; the other
/// fields Kubernetes writes are accepted and ignored, anything else is
/// refused: a misspelt `namespace` would otherwise move the resource.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: Option<String>,
    pub namespace: Option<String>,
    #[serde(rename = "labels")]
    _labels: Option<serde::de::IgnoredAny>,
    #[serde(rename = "annotations")]
    _annotations: Option<serde::de::IgnoredAny>,
    #[serde(rename = "uid")]
    _uid: Option<serde::de::IgnoredAny>,
    #[serde(rename = "resourceVersion")]
    _resource_version: Option<serde::de::IgnoredAny>,
    #[serde(rename = "generation")]
    _generation: Option<serde::de::IgnoredAny>,
    #[serde(rename = "creationTimestamp")]
    _creation_timestamp: Option<serde::de::IgnoredAny>,
    #[serde(rename = "managedFields")]
    _managed_fields: Option<serde::de::IgnoredAny>,
    #[serde(rename = "ownerReferences")]
    _owner_references: Option<serde::de::IgnoredAny>,
    #[serde(rename = "finalizers")]
    _finalizers: Option<serde::de::IgnoredAny>,
    #[serde(rename = "generateName")]
    _generate_name: Option<serde::de::IgnoredAny>,
}
