//! Raw Linux uAPI bindings (placeholder until the generated bindings land).
