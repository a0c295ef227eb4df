"""demo-data --kind signals: galaxy-like images and spectra that share hidden parameters.

Each object (a concept) is a galaxy of one type (its category: elliptical,
spiral, starburst) with a redshift ``z`` and a stellar mass. Both modalities
are rendered from these same hidden parameters:

- the image: a Sersic-like blob (de Vaucouleurs for ellipticals, exponential
  with two arms for spirals, compact for starbursts) whose angular size
  shrinks with ``z`` and grows with mass, whose ellipticity depends on the
  type, and whose colour is the type's rest-frame colour reddened with ``z``
  and with the object's dust;
- the spectrum: ``bins`` float32 fluxes over 3600-10000 Angstrom: the type's
  continuum (slope, 4000 Angstrom break) and its emission lines ([OII],
  H-beta, [OIII], H-alpha) and absorption lines (Ca H+K, Mg b, Na D), all at
  their rest wavelengths times ``1 + z``, the continuum tilted red by the same
  dust.

Every object is seen ``views`` times: each view is another exposure (image
rotated, shifted and with its own noise; spectrum with its own noise and
gain), so the split stage holds out whole objects. Files are
``<out>/<type>/<object>/view_<k>.png`` and ``<out>/signals.parquet`` holds one row
per image keyed by ``source`` (the path relative to ``<out>``): ``spectrum``
(``fixed_size_list<float32>[bins]``), ``redshift`` and ``stellar_mass`` (log10
solar masses). One view's spectrum has a NaN planted: ingest rejects it with
the reason. ``demo_manifest.json`` lists every object's hidden parameters.

    embedpipe demo-data --kind signals OUT
    embedpipe ingest OUT --out IMAGES --signals OUT/signals.parquet --signal-key source
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from embedpipe.core import storage
from embedpipe.core.seeding import derived_seed

GALAXY_TYPES = ("elliptical", "spiral", "starburst")
SIGNALS_NAME = "signals.parquet"
MANIFEST_NAME = "demo_manifest.json"
WAVELENGTH_RANGE = (3600.0, 10000.0)  # observed, Angstrom
REDSHIFT_RANGE = (0.02, 0.5)
EMISSION_LINES = {"[OII]": 3727.0, "Hbeta": 4861.0, "[OIII]": 5007.0, "Halpha": 6563.0}
ABSORPTION_LINES = {"CaK": 3934.0, "CaH": 3969.0, "Mgb": 5175.0, "NaD": 5893.0}


@dataclass(frozen=True)
class GalaxyType:
    sersic_index: float
    ellipticity: tuple[float, float]
    mean_mass: float
    colour: tuple[float, float, float]  # rest-frame RGB weights
    slope: float  # continuum ~ lambda ** slope
    break_depth: float  # flux kept blueward of 4000 Angstrom
    emission: dict[str, float]  # line peak over the continuum at 5500 Angstrom
    absorption: float  # depth of the absorption lines
    arms: bool


TYPES = {
    "elliptical": GalaxyType(
        4.0, (0.0, 0.3), 10.9, (1.0, 0.78, 0.52), 1.2, 0.5,
        {"[OII]": 0.05, "Hbeta": 0.0, "[OIII]": 0.03, "Halpha": 0.05}, 0.35, False,
    ),
    "spiral": GalaxyType(
        1.0, (0.3, 0.7), 10.3, (0.82, 0.86, 1.0), 0.2, 0.8,
        {"[OII]": 0.5, "Hbeta": 0.35, "[OIII]": 0.3, "Halpha": 1.2}, 0.12, True,
    ),
    "starburst": GalaxyType(
        0.7, (0.1, 0.5), 9.6, (0.6, 0.8, 1.0), -1.0, 1.0,
        {"[OII]": 1.2, "Hbeta": 0.8, "[OIII]": 2.0, "Halpha": 2.5}, 0.0, False,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class SignalDemoSpec:
    types: int = 3
    objects: int = 40  # per type
    views: int = 4  # exposures per object
    size: int = 64
    bins: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.types <= len(GALAXY_TYPES):
            raise ValueError(f"types (--categories) must be between 1 and {len(GALAXY_TYPES)}")
        if self.objects < 2:
            raise ValueError("objects per type (--concepts) must be at least 2")
        if self.views < 1:
            raise ValueError("views per object (--images) must be at least 1")
        if self.size < 32:
            raise ValueError("size must be at least 32 pixels")
        if self.bins < 32:
            raise ValueError("bins must be at least 32")


@dataclass(frozen=True)
class Galaxy:
    name: str
    kind: str
    redshift: float
    stellar_mass: float  # log10 solar masses
    ellipticity: float
    angle: float  # position angle, radians
    radius: float  # effective radius in pixels at size 64
    dust: float  # reddening of image colour and spectral slope, independent of z

    @classmethod
    def draw(cls, name: str, kind: str, rng: np.random.Generator) -> Galaxy:
        family = TYPES[kind]
        redshift = float(rng.uniform(*REDSHIFT_RANGE))
        mass = float(family.mean_mass + 0.8 * redshift + rng.normal(0, 0.3))
        ellipticity = float(rng.uniform(*family.ellipticity))
        physical = 2.0 + 1.6 * (mass - 9.5) + rng.normal(0, 0.3)
        radius = float(np.clip(physical * 0.9 / (redshift + 0.2), 3.0, 16.0))
        angle = float(rng.uniform(0, math.pi))
        dust = float(rng.uniform(0, 0.4))
        return cls(name, kind, redshift, mass, ellipticity, angle, radius, dust)


def wavelengths(bins: int) -> np.ndarray:
    return np.linspace(*WAVELENGTH_RANGE, bins)


def rest_spectrum(kind: str, rest: np.ndarray) -> np.ndarray:
    """The type's noiseless flux at rest-frame wavelengths ``rest`` (1 near 5500 A)."""
    family = TYPES[kind]
    flux = (rest / 5500.0) ** family.slope
    flux *= family.break_depth + (1 - family.break_depth) / (1 + np.exp(-(rest - 4000.0) / 60))
    sigma = 14.0  # line width, rest-frame Angstrom
    for line, centre in ABSORPTION_LINES.items():
        depth = family.absorption * (0.6 if line in ("Mgb", "NaD") else 1.0)
        flux *= 1 - depth * np.exp(-0.5 * ((rest - centre) / (1.5 * sigma)) ** 2)
    for line, centre in EMISSION_LINES.items():
        flux += family.emission[line] * np.exp(-0.5 * ((rest - centre) / sigma) ** 2)
    return flux


def render_spectrum(galaxy: Galaxy, bins: int, rng: np.random.Generator) -> np.ndarray:
    """One exposure: the rest-frame spectrum seen at ``(1 + z)``, a gain and noise."""
    observed = wavelengths(bins)
    rest = observed / (1 + galaxy.redshift)
    flux = rest_spectrum(galaxy.kind, rest) * (rest / 5500.0) ** galaxy.dust
    brightness = 10 ** (0.4 * (galaxy.stellar_mass - 10.0)) / (1 + 4 * galaxy.redshift)
    gain = rng.uniform(0.9, 1.1)
    flux = flux * brightness * gain
    noise = rng.normal(0, 0.04 * float(np.median(flux)) + 0.01, size=bins)
    return (flux + noise).astype(np.float32)


def render_galaxy(galaxy: Galaxy, size: int, rng: np.random.Generator) -> Image.Image:
    """One exposure: the galaxy rotated and shifted a little, with sky noise."""
    family = TYPES[galaxy.kind]
    scale = size / 64
    shift = rng.uniform(-2, 2, size=2) * scale
    axis = (np.arange(size) - (size - 1) / 2) / scale
    y, x = np.meshgrid(axis - shift[1] / scale, axis - shift[0] / scale, indexing="ij")
    angle = galaxy.angle + rng.uniform(-0.35, 0.35)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    r = np.sqrt(u**2 + (v / (1 - galaxy.ellipticity)) ** 2) + 1e-6
    n = family.sersic_index
    b_n = 2 * n - 1 / 3
    profile = np.exp(-b_n * ((r / galaxy.radius) ** (1 / n) - 1))
    core = math.exp(-b_n * (0.25 ** (1 / n) - 1))  # a flat core inside a quarter radius
    profile = np.minimum(profile, core) / core
    if family.arms:
        theta = np.arctan2(v, u)
        profile *= 1 + 0.45 * np.cos(2 * (theta - 2.2 * np.log(r / galaxy.radius + 0.3)))
    reddening = 1 + 1.8 * galaxy.redshift + galaxy.dust
    colour = np.array(family.colour) * np.array([reddening, 1.0, 1 / reddening])
    colour /= colour.max()
    peak = float(np.clip(0.7 + 0.2 * (galaxy.stellar_mass - 10.0) - 0.4 * galaxy.redshift, 0.3, 1))
    pixels = 0.03 + peak * profile[..., None] * colour[None, None, :]
    pixels += rng.normal(0, 0.025, size=pixels.shape)
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8), "RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def generate_signal_demo(out_uri: str, spec: SignalDemoSpec | None = None) -> dict:
    """Write the signals demo under ``out_uri`` and return its manifest."""
    spec = spec or SignalDemoSpec()
    out_uri = storage.normalize(out_uri)
    sources, spectra, redshifts, masses, objects = [], [], [], [], []
    for kind in GALAXY_TYPES[: spec.types]:
        for number in range(spec.objects):
            name = f"{kind}-{number:03d}"
            galaxy = Galaxy.draw(name, kind, np.random.default_rng(derived_seed(spec.seed, name)))
            objects.append(asdict(galaxy))
            for view in range(spec.views):
                rng = np.random.default_rng(derived_seed(spec.seed, name, str(view)))
                relative = f"{kind}/{name}/view_{view}.png"
                storage.write_bytes(
                    storage.join(out_uri, relative), _png(render_galaxy(galaxy, spec.size, rng))
                )
                sources.append(relative)
                spectra.append(render_spectrum(galaxy, spec.bins, rng))
                redshifts.append(galaxy.redshift)
                masses.append(galaxy.stellar_mass)
    planted = sources[spec.views - 1]  # the first object's last view
    spectra[spec.views - 1] = spectra[spec.views - 1].copy()
    spectra[spec.views - 1][spec.bins // 2] = np.nan
    flat = pa.array(np.concatenate(spectra), pa.float32())
    table = pa.table(
        {
            "source": sources,
            "spectrum": pa.FixedSizeListArray.from_arrays(flat, spec.bins),
            "redshift": pa.array(redshifts, pa.float64()),
            "stellar_mass": pa.array(masses, pa.float64()),
        }
    )
    with storage.atomic_output(storage.join(out_uri, SIGNALS_NAME)) as path:
        pq.write_table(table, path)
    manifest = {
        "kind": "signals",
        "spec": asdict(spec),
        "layout": "<type>/<object>/view_<k>.png",
        "signals": SIGNALS_NAME,
        "signal_key": "source",
        "wavelengths": [*WAVELENGTH_RANGE, spec.bins],
        "images": len(sources),
        "non_finite_spectrum": planted,
        "objects": objects,
    }
    storage.write_json(storage.join(out_uri, MANIFEST_NAME), manifest)
    return manifest
