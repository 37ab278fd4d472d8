//! Models: TF-IDF features, linear classifiers, ONNX classifiers, metrics and the bundle format
//! they ship in.

pub mod bert;
pub mod bundle;
pub mod linear;
pub mod metrics;
pub mod pyfunc;
pub mod rng;
pub mod sparse;
pub mod tfidf;
