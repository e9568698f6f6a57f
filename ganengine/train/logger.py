"""Training logs: a CSV of losses, PNG sample grids, and TensorBoard when it is installed.

TensorBoard is optional (``pip install tensorboard``): without it ganengine says so once and
keeps writing the CSV and the PNG grids, which hold the same information.
"""
from __future__ import annotations

import csv
import os

import torch

from ganengine.data.transforms import to_image


def make_grid(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Rows of (N, C, H, W) images in [-1, 1] -> one (3, H', W') image, rows stacked vertically."""
    n = max(r.shape[0] for r in rows)
    h = max(r.shape[2] for r in rows)
    w = max(r.shape[3] for r in rows)
    grid = torch.ones(3, len(rows) * (h + pad) + pad, n * (w + pad) + pad)
    for i, row in enumerate(rows):
        row = row.detach().float().cpu().clamp(-1, 1)
        if row.shape[1] == 1:
            row = row.expand(-1, 3, -1, -1)
        for j in range(row.shape[0]):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y:y + row.shape[2], x:x + row.shape[3]] = row[j, :3]
    return grid


def label_rows(image, labels: list[str], n_rows: int, pad: int = 2):
    """The grid image with a white strip on the left naming each row (PIL's built-in font)."""
    from PIL import Image, ImageDraw, ImageFont

    if len(labels) != n_rows:
        raise ValueError(f"label_rows: {len(labels)} labels for {n_rows} rows")
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(image)
    width = max(int(draw.textlength(t, font=font)) for t in labels) + 2 * pad + 4
    out = Image.new("RGB", (image.width + width, image.height), "white")
    out.paste(image, (width, 0))
    draw = ImageDraw.Draw(out)
    row_h = (image.height - pad) / n_rows
    for i, text in enumerate(labels):
        top, bottom = pad + i * row_h, pad + (i + 1) * row_h - pad
        box = draw.textbbox((0, 0), text, font=font)
        draw.text((pad + 2, (top + bottom - (box[3] - box[1])) / 2 - box[1]), text, fill="black", font=font)
    return out


def save_grid(rows: list[torch.Tensor], path: str, labels: list[str] | None = None) -> None:
    """Write the rows as one PNG; ``labels`` (one per row) name the rows in a strip on the left."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image = to_image(make_grid(rows))
    if labels:
        image = label_rows(image, labels, len(rows))
    image.save(path)


class TrainLogger:
    def __init__(self, log_dir: str, tensorboard: str = "auto", resume_step: int | None = None):
        self.log_dir = log_dir
        os.makedirs(log_dir, exist_ok=True)
        self.csv_path = os.path.join(log_dir, "loss_log.csv")
        self.columns: list[str] | None = None
        if resume_step is not None and os.path.exists(self.csv_path):
            self._truncate(resume_step)
        elif os.path.exists(self.csv_path):
            os.unlink(self.csv_path)  # a fresh run in an old folder starts a fresh log
        self.tb = None
        self.note = None
        if tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(log_dir, "tensorboard"), purge_step=resume_step)
            except ImportError:
                if tensorboard == "on":
                    raise ValueError("--tensorboard on needs the tensorboard package: pip install tensorboard") from None
                self.note = ("TensorBoard logging is off (the tensorboard package is not installed; "
                             "pip install tensorboard to get it). Losses go to loss_log.csv, samples to samples/*.png.")

    def _truncate(self, step: int) -> None:
        """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
        with open(self.csv_path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        self.columns = rows[0]
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        with open(self.csv_path, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    def scalars(self, step: int, epoch: int, values: dict[str, float]) -> None:
        names = sorted(values)
        if self.columns is None:
            self.columns = ["step", "epoch"] + names
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        elif set(names) - set(self.columns):  # a loss that appears later (e.g. every n_critic-th step)
            self.columns = self.columns + sorted(set(names) - set(self.columns))
            with open(self.csv_path, newline="") as f:
                old = list(csv.reader(f))[1:]
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerows([self.columns] + [r + [""] * (len(self.columns) - len(r)) for r in old])
        # a loss this step did not compute (the generator's on a critic-only step) is an empty cell,
        # as in the rows written before the column appeared: not NaN, which reads as divergence
        row = [step, epoch] + [values.get(c, "") for c in self.columns[2:]]
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def images(self, step: int, rows: list[torch.Tensor], labels: list[str] | None = None) -> str:
        path = os.path.join(self.log_dir, "samples", f"step_{step:08d}.png")
        save_grid(rows, path, labels)
        if self.tb is not None:
            self.tb.add_image("samples", (make_grid(rows) + 1) / 2, step)
        return path

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
