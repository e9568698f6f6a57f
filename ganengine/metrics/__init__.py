"""Evaluation metrics that work offline (``import ganengine.metrics``).

* ``frechet_distance(a, b)`` (FID on Inception features), ``kernel_inception_distance(a, b)``
  (KID) on (N, D) feature tensors or arrays; ``FeatureStats`` streaming mean/covariance.
* ``intra_class_frechet_distance(real, real_labels, fake, fake_labels)`` (conditional models);
  ``precision_recall(real, fake, k=3)`` (Kynkaanniemi et al.), ``density_coverage(real, fake,
  k=5)`` (Naeem et al.) on features; ``inception_score(logits, splits=10)`` on classifier logits.
* ``FIDInceptionV3`` / ``load_fid_inception(path)``: the standard FID feature network from the
  user's weights file (nothing is downloaded); any nn.Module works as a feature extractor.
* ``l1_error``, ``psnr``, ``ssim`` (pix2pix), ``attribute_accuracy`` (StarGAN).
* ``evaluate_generator(model, loader, metrics, feature_extractor)``: all of it over a loader,
  for ``ganengine evaluate`` and for training-time evaluation.
"""
from ganengine.metrics.accuracy import AttributeAccuracy, attribute_accuracy
from ganengine.metrics.evaluate import METRICS, MODES, evaluate_generator, is_better, parse_metrics
from ganengine.metrics.features import extract_features, load_object, resolve_feature_extractor
from ganengine.metrics.frechet import frechet_distance, frechet_distance_from_stats, intra_class_frechet_distance
from ganengine.metrics.inception import FIDInceptionV3, load_fid_inception
from ganengine.metrics.inception_score import InceptionScore, inception_score
from ganengine.metrics.kid import kernel_inception_distance
from ganengine.metrics.manifold import DensityCoverage, PrecisionRecall, density_coverage, precision_recall
from ganengine.metrics.paired import l1_error, psnr, ssim
from ganengine.metrics.stats import FeatureStats

__all__ = ["AttributeAccuracy", "attribute_accuracy", "METRICS", "MODES", "evaluate_generator", "is_better",
           "parse_metrics", "extract_features", "load_object", "resolve_feature_extractor", "frechet_distance",
           "frechet_distance_from_stats", "FIDInceptionV3", "load_fid_inception", "kernel_inception_distance",
           "l1_error", "psnr", "ssim", "FeatureStats", "inception_score", "InceptionScore",
           "precision_recall", "PrecisionRecall", "intra_class_frechet_distance", "density_coverage", "DensityCoverage"]
