"""IC-GAN and cc-IC-GAN (Casanova et al. 2021; facebookresearch/ic_gan), BigGAN conditioned on
instance features, trained as its ``BigGAN_PyTorch/train_fns.py`` does.

The step is BigGAN's (``models/biggan.py``: ``num_D_steps`` hinge steps over chunks of the real
batch, ortho regularisation, ``toggle_grads``, G EMA, LOGAN option) with the conditionings of
IC-GAN: a real item is (h_i, x_j, y_j) with x_j drawn from the k-NN neighbourhood of instance i
(``ganengine/data/instance_features.py``); the generator's conditionings are drawn as the
reference's ``sample_conditioning_instance_balance``: an instance h uniformly from the dataset's
features and, for cc-IC-GAN (``class_cond``), the label of a uniform neighbour of it. D scores
``cat([G(z, y_g, h_g), x])`` with ``cat([y_g, y])`` and ``cat([h_g, h])`` in one pass.

Options: BigGAN's train.py flags with their defaults, plus IC-GAN's (``class_cond`` False,
``G_shared_feat`` False, ``shared_dim_feat`` 2048, ``k_nn`` 50: the reference's argparse defaults),
``instance_sz`` (the feature width: from the data), ``feature_file`` ("" = pixel features) and
``dataroot`` (the dataset the instances come from; "" = the built-in digits). ``G_shared`` is on
(IC-GAN cannot run without it). Not built: the reference's ``feature_augmentation`` (features of
flipped images), ``which_knn_balance nnclass_balance`` and k-means / subsampled instance sets.
"""
from __future__ import annotations

import os

import torch

from ganengine.models.biggan import BIGGAN_DEFAULTS, BigGAN
from ganengine.models.icgan_networks import ICGANDiscriminator, ICGANGenerator
from ganengine.models.synthesis_tools import class_indices

ICGAN_DEFAULTS = dict(BIGGAN_DEFAULTS, G_shared=True, class_cond=False, G_shared_feat=False, shared_dim_feat=2048,
                      instance_sz=2048, k_nn=50, feature_file="", feature_digest="", dataroot="")


class ICGAN(BigGAN):
    MODEL_NAME = "icgan"
    DEFAULTS = dict(ICGAN_DEFAULTS)
    _G_CLASS, _D_CLASS = ICGANGenerator, ICGANDiscriminator

    def __init__(self, **options):
        super().__init__(**options)
        self._bank = None

    @property
    def CONDITIONAL(self) -> bool:  # noqa: N802 (the synthesis models' flag: evaluation's intra-FID, grids)
        return bool(self.options["class_cond"])

    def _net_args(self) -> dict:
        skip = ("fused", "fused_optimizer", "k_nn", "feature_file", "feature_digest", "dataroot")
        return {k: v for k, v in self.options.items() if k not in skip}

    # -- instances -------------------------------------------------------------------------------
    @property
    def bank(self):
        """The dataset's instance features and neighbourhoods (built on first use from the options)."""
        if self._bank is None:
            from ganengine.data.instance_features import check_digest, instance_bank

            o = self.options
            bank = instance_bank(o["dataroot"] or None, o["resolution"], o["feature_file"] or None, o["k_nn"])
            self.set_bank(check_digest(bank, o["feature_file"], o["feature_digest"]))
        return self._bank

    def use_feature_file(self, path: str, data_options: dict | None = None) -> None:
        """Read the instance features from ``path`` from now on (a feature file moved since
        training: ``--feature_file`` of sample / evaluate); its features must be the recorded ones
        (checked when they are read)."""
        import os

        if not self.options.get("feature_file"):
            raise ValueError("--feature_file: this IC-GAN model was trained on pixel features (no feature file): "
                             "leave it out")
        self.options["feature_file"] = os.path.abspath(path)
        if data_options is not None:
            data_options["feature_file"] = self.options["feature_file"]
        self._bank = None  # (built from the options on first use)

    def resume_differences(self, diff: dict) -> dict:
        """The option differences that stop a resume, from the engine's {option: (old, new)}: a
        moved feature file holding the recorded features is none, nor is a digest a checkpoint
        written before digests existed does not have; changed features are said as such."""
        diff = dict(diff)
        if "feature_digest" in diff:
            old, new = diff["feature_digest"]
            if not old:
                diff.pop("feature_digest")
            elif new:
                raise ValueError(f"--resume: the feature file {self.options['feature_file']!r} holds other features "
                                 "than the run was trained with (its contents changed); resume with the training's "
                                 "feature file")
        elif "feature_file" in diff and self.options.get("feature_digest"):
            diff.pop("feature_file")  # (the same features, recorded digest and file's agree: a moved file)
        if "dataroot" in diff:
            old, new = diff["dataroot"]
            if old and new and os.path.abspath(old) == new:  # (runs before dataroots were recorded absolute)
                diff.pop("dataroot")
        return diff

    def set_bank(self, bank) -> None:
        """Use ``bank`` (an ``InstanceBank``) for the generator's conditionings; its width must be
        the networks' (``instance_sz``, and ``shared_dim_feat`` without ``G_shared_feat``)."""
        o = self.options
        if bank.dim != o["instance_sz"]:
            raise ValueError(f"{type(self).__name__}: the instance features ({bank.source}) are {bank.dim}-dimensional but "
                             f"instance_sz is {o['instance_sz']}; set instance_sz={bank.dim}")
        if not o["G_shared_feat"] and bank.dim != o["shared_dim_feat"]:
            raise ValueError(f"{type(self).__name__}: without G_shared_feat the features enter G's batch norms as "
                             f"they are, so shared_dim_feat must be their width {bank.dim}, got "
                             f"{o['shared_dim_feat']} (or set G_shared_feat true)")
        if o["class_cond"] and int(bank.labels.max()) >= o["n_classes"]:
            raise ValueError(f"{type(self).__name__}: the data has labels up to {int(bank.labels.max())} but "
                             f"n_classes is {o['n_classes']}")
        self._bank = bank

    def sample_conditionings(self, n: int):
        """(labels or None, features) for n generated images, drawn from the dataset (reference)."""
        feats, labels, _ = self.bank.sample(n, self.device)
        return (labels if self.options["class_cond"] else None), feats

    # -- training: BigGAN's step over IC-GAN's conditionings --------------------------------------
    def _real_chunks(self, batch: dict):
        o = self.options
        owner = type(self).__name__
        x = self._to_device(batch["image"])
        if "feature" not in batch:
            raise ValueError(f"{owner}: the batch has no 'feature' (instance features): train on "
                             "build_dataset('icgan', ...), whose items carry them")
        h = self._to_device(batch["feature"]).to(torch.float32)
        y = self._to_device(class_indices(batch["label"], o["n_classes"], owner)) if o["class_cond"] else None
        xs, ys = self._chunks(x, y if y is not None else torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        hs = torch.split(h, xs[0].shape[0]) if xs else ()
        return x, xs, [(ys[i] if y is not None else None, hs[i]) for i in range(len(xs))]

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, n: int | None = None, labels=None, z: torch.Tensor | None = None, features=None) -> torch.Tensor:
        """Images in [-1, 1] for instance ``features`` (drawn from the dataset when None, with
        their neighbours' labels for cc-IC-GAN), ``labels`` (cc-IC-GAN) and ``z`` (random when
        None). ``G_eval_mode`` samples in eval mode, otherwise in training mode as the reference
        does; the sampling G's buffers are restored afterwards (sampling never changes training)."""
        o = self.options
        G = self.sampling_generator()
        if n is None:
            n = next(t.shape[0] for t in (z, features, labels) if t is not None)
        if features is None:
            drawn_labels, features = self.sample_conditionings(int(n))
            labels = drawn_labels if labels is None else labels
        features = torch.as_tensor(features).to(self.device, torch.float32)
        if o["class_cond"]:
            if labels is None:
                raise ValueError(f"{type(self).__name__}: cc-IC-GAN needs labels with the given features")
            labels = class_indices(torch.as_tensor(labels), o["n_classes"], type(self).__name__).to(self.device)
        else:
            labels = None
        z = self.sample_z(features.shape[0]) if z is None else z.to(self.device)
        saved = [(b, b.clone()) for b in G.buffers()]
        was = G.training
        G.train(not o["G_eval_mode"])
        try:
            return G(z, labels, features)
        finally:
            G.train(was)
            for b, v in saved:
                b.copy_(v)

    @torch.no_grad()
    def translate(self, batch: dict) -> torch.Tensor:
        return self.generate(labels=batch.get("label"), z=batch.get("z"), features=batch.get("feature"))

    @torch.no_grad()
    def instance_rows(self, batch: dict, max_rows: int = 10) -> list:
        """Sample-grid rows: per conditioning instance of ``batch`` (the first ``max_rows``), its
        image, then G's images for it from fixed latents (the same in every row and at every call)."""
        imgs, feats = batch["image"], batch["feature"]
        n = imgs.shape[0]
        cols = max(1, n - 1)
        g = torch.Generator().manual_seed(1234)
        z = torch.randn(cols, self.latent_dim(), generator=g) * self.options["z_var"]
        rows = []
        for i in range(min(n, max_rows)):
            labels = batch["label"][i:i + 1].expand(cols) if self.options["class_cond"] else None
            out = self.generate(z=z, features=feats[i:i + 1].expand(cols, -1), labels=labels)
            rows.append(torch.cat([imgs[i:i + 1], out.to(imgs.device, imgs.dtype)]))
        return rows

    def instance_row_labels(self, n_rows: int, class_names=None) -> list:
        return [f"instance {i + 1}: its image, then G(z, h)" for i in range(n_rows)]


def derive_options(model_opts: dict, data_opts: dict) -> None:
    """``ganengine train icgan``: the feature file and k reach the dataset; ``instance_sz`` (and
    ``shared_dim_feat`` without ``G_shared_feat``) follow the features unless given."""
    import os

    from ganengine.data.instance_features import instance_bank

    d = ICGAN.DEFAULTS
    ff = model_opts.get("feature_file") or ""
    if ff:
        ff = model_opts["feature_file"] = os.path.abspath(ff)
    data_opts["feature_file"], data_opts["k_nn"] = ff, model_opts.get("k_nn", d["k_nn"])
    if data_opts.get("dataroot"):
        model_opts["dataroot"] = data_opts["dataroot"]
    bank = instance_bank(data_opts.get("dataroot") or None, data_opts["image_size"], ff or None, data_opts["k_nn"])
    for name in ("instance_sz",) + (() if model_opts.get("G_shared_feat", d["G_shared_feat"]) else ("shared_dim_feat",)):
        if name in model_opts and model_opts[name] != bank.dim:
            why = "" if name == "instance_sz" else " (without --G_shared_feat the features enter G's norms as they are)"
            raise ValueError(f"--{name} {model_opts[name]} (given, or a sample-data default) does not match the instance "
                             f"features' width {bank.dim} ({bank.source}){why}: pass --{name} {bank.dim} or leave it "
                             "out")
        model_opts[name] = bank.dim
    if ff:  # recorded in the checkpoint: sampling later checks the file still holds these features
        model_opts["feature_digest"] = data_opts["feature_digest"] = bank.digest
