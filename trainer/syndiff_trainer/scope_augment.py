"""What differs between scopes and centres, as augmentation (albumentations transforms).

A model trained on one hospital's frames learns that hospital's colour response, field-of-view
shape, overlay text and compression. Kvasir-SEG frames carry a black box in one corner and
white text; CVC-ClinicDB frames are smaller, softer and framed differently. These transforms
draw those differences at random, so none of them can stand in for "polyp":
  colour and exposure: white balance (Planckian jitter), gamma, tone curve, RGB shift
  optics: vignetting (corner / gaussian illumination), specular highlights, defocus, motion blur
  capture: JPEG compression, resolution loss (downscale), sensor noise
  framing: field-of-view shapes (circle, octagon, rounded rectangle) with black borders, black
           corner boxes, on-screen text
Every random choice comes from the transform's own generator, so `Compose.set_random_seed`
fixes the whole draw.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

TEXT_SNIPPETS = ("OLYMPUS", "CV-190", "PENTAX", "FUJINON", "EG-760", "12:04:31", "2015/03/11", "Ex:0",
                 "Cvp:3", "ID: 00231", "SCOPE 1", "NBI", "Eh:A5", "Zoom x1.2")


class FieldOfView(A.DualTransform):
    """Black out everything outside a circle, octagon or rounded rectangle (the scope's view);
    the label is cleared there too, since nothing outside the view can be seen."""

    def __init__(self, p: float = 0.5):
        super().__init__(p=p)

    def get_params_dependent_on_data(self, params, data):
        h, w = params["shape"][:2]
        r = self.py_random
        shape = r.choice(("circle", "octagon", "rounded"))
        scale = r.uniform(0.85, 1.1)
        cx, cy = w / 2 + r.uniform(-0.05, 0.05) * w, h / 2 + r.uniform(-0.05, 0.05) * h
        fov = np.zeros((h, w), np.uint8)
        if shape == "circle":
            cv2.circle(fov, (int(cx), int(cy)), int(scale * min(h, w) / 2 * 1.05), 1, -1)
        elif shape == "octagon":
            a, cut = scale * min(h, w) / 2, scale * min(h, w) / 2 * r.uniform(0.3, 0.45)
            pts = [(-a + cut, -a), (a - cut, -a), (a, -a + cut), (a, a - cut), (a - cut, a), (-a + cut, a),
                   (-a, a - cut), (-a, -a + cut)]
            cv2.fillPoly(fov, [np.array([(cx + x, cy + y) for x, y in pts], np.int32)], 1)
        else:
            rad = int(min(h, w) * r.uniform(0.1, 0.25))
            x0, y0 = int(w * r.uniform(0.02, 0.1)), int(h * r.uniform(0.02, 0.1))
            x1, y1 = w - int(w * r.uniform(0.02, 0.1)), h - int(h * r.uniform(0.02, 0.1))
            cv2.rectangle(fov, (x0 + rad, y0), (x1 - rad, y1), 1, -1)
            cv2.rectangle(fov, (x0, y0 + rad), (x1, y1 - rad), 1, -1)
            for x, y in ((x0 + rad, y0 + rad), (x1 - rad, y0 + rad), (x0 + rad, y1 - rad), (x1 - rad, y1 - rad)):
                cv2.circle(fov, (x, y), rad, 1, -1)
        return {"fov": fov}

    def apply(self, img, fov=None, **params):
        return img * fov[..., None].astype(img.dtype)

    def apply_to_mask(self, mask, fov=None, **params):
        return mask * fov.astype(mask.dtype)

    def get_transform_init_args_names(self):
        return ()


class ScreenOverlay(A.ImageOnlyTransform):
    """A black box in one corner (Kvasir-SEG's scope-position inset) and/or on-screen text."""

    def __init__(self, p: float = 0.4):
        super().__init__(p=p)

    def get_params_dependent_on_data(self, params, data):
        h, w = params["shape"][:2]
        r = self.py_random
        box = None
        if r.random() < 0.5:
            bw, bh = int(w * r.uniform(0.15, 0.32)), int(h * r.uniform(0.15, 0.32))
            corner = r.choice(((0, 0), (w - bw, 0), (0, h - bh), (w - bw, h - bh)))
            box = (corner[0], corner[1], bw, bh)
        texts = [(r.choice(TEXT_SNIPPETS), int(w * r.uniform(0.0, 0.7)), int(h * r.uniform(0.05, 1.0)),
                  r.uniform(0.25, 0.5), r.choice(((255, 255, 255), (0, 255, 0), (255, 255, 0))))
                 for _ in range(r.randint(0, 4))]
        return {"box": box, "texts": texts}

    def apply(self, img, box=None, texts=(), **params):
        img = img.copy()
        if box is not None:
            x, y, bw, bh = box
            img[y:y + bh, x:x + bw] = 0
        for text, x, y, scale, colour in texts:
            cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
        return img

    def get_transform_init_args_names(self):
        return ()


class SpecularHighlights(A.ImageOnlyTransform):
    """Small saturated reflections of the scope's light on wet mucosa."""

    def __init__(self, p: float = 0.3):
        super().__init__(p=p)

    def get_params_dependent_on_data(self, params, data):
        h, w = params["shape"][:2]
        r = self.py_random
        spots = [(int(w * r.uniform(0.1, 0.9)), int(h * r.uniform(0.1, 0.9)), int(min(h, w) * r.uniform(0.005, 0.03)),
                  int(min(h, w) * r.uniform(0.005, 0.02)), r.uniform(0, 180)) for _ in range(r.randint(1, 8))]
        return {"spots": spots}

    def apply(self, img, spots=(), **params):
        layer = np.zeros(img.shape[:2], np.float32)
        for x, y, a, b, angle in spots:
            cv2.ellipse(layer, (x, y), (max(1, a), max(1, b)), angle, 0, 360, 1.0, -1)
        layer = cv2.GaussianBlur(layer, (0, 0), 1.2)[..., None]
        out = img.astype(np.float32) * (1 - layer) + 255 * layer
        return np.clip(out, 0, 255).astype(np.uint8)

    def get_transform_init_args_names(self):
        return ()


def scope_transforms() -> list:
    return [
        A.OneOf([A.PlanckianJitter(mode="blackbody"), A.RGBShift(r_shift_limit=15, g_shift_limit=10, b_shift_limit=15)], p=0.5),
        A.RandomGamma(gamma_limit=(70, 140), p=0.4),
        A.RandomToneCurve(scale=0.1, p=0.2),
        A.OneOf([A.Illumination(mode="corner", intensity_range=(0.08, 0.2), effect_type="darken"),
                 A.Illumination(mode="gaussian", intensity_range=(0.05, 0.2), effect_type="both")], p=0.4),
        SpecularHighlights(p=0.3),
        A.OneOf([A.Defocus(radius=(2, 4), alias_blur=(0.1, 0.3)), A.MotionBlur(blur_limit=(5, 9))], p=0.2),
        A.Downscale(scale_range=(0.4, 0.8), p=0.25),
        A.ImageCompression(quality_range=(30, 85), p=0.3),
        FieldOfView(p=0.4),
        ScreenOverlay(p=0.4),
    ]


class ChannelMix(A.ImageOnlyTransform):
    """Each output channel a random mix of the three input channels (a 3 x 3 matrix near the
    identity, rows summing to one so grey stays grey): a scope's spectral response, and light
    modes such as BLI, LCI or FICE, move colours along directions that hue and white-balance
    jitter do not reach."""

    def __init__(self, sigma: float = 0.2, p: float = 0.5):
        super().__init__(p=p)
        self.sigma = sigma

    def get_params_dependent_on_data(self, params, data):
        r = self.py_random
        m = np.eye(3, dtype=np.float32) + np.array([[r.gauss(0, self.sigma) for _ in range(3)] for _ in range(3)],
                                                   np.float32)
        m /= np.where(np.abs(m.sum(1, keepdims=True)) < 0.2, 1.0, m.sum(1, keepdims=True))
        return {"matrix": m}

    def apply(self, img, matrix=None, **params):
        return np.clip(img.astype(np.float32) @ matrix.T, 0, 255).astype(np.uint8)

    def get_transform_init_args_names(self):
        return ("sigma",)


def colour_transforms() -> list:
    """Strong colour variation (recipe `augment.colour = "strong"`): one of a wide hue and
    saturation shift, a channel mix, or grey, on about half the samples."""
    return [
        A.OneOf([A.HueSaturationValue(hue_shift_limit=18, sat_shift_limit=40, val_shift_limit=15, p=1.0),
                 ChannelMix(sigma=0.2, p=1.0),
                 A.ToGray(p=0.3)], p=0.6),
    ]
