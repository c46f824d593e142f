"""Pooled features of a frozen segmenter for presence experiments: per image, avg+max pools of the
encoder's mid block (128 ch at 16x16), z_c, the U-Net's mid block, z0~, and the predicted mask area.
Sets: pos (training centres' frames + decoys), neg (their crops + erased frames), held (third
centre), free (polyp-free-val). Usage: MODEL TRAIN_DIRS HELD_DIR OUT.npz"""
import sys, time
import numpy as np, torch
from syndiff_stream.model import Segmenter
from syndiff_stream.preprocess import to_model_range
from syndiff_trainer.data import load_dataset
from syndiff_trainer.negatives import load_crops, load_polyp_free, erase_polyps
torch.set_num_threads(1)
m = Segmenter.from_pretrained(sys.argv[1]).eval()
S = m.config.image_size
grab = {}
m.vision_encoder.encoder.mid_block.register_forward_hook(lambda mod, i, o: grab.__setitem__("enc", o))
m.unet.mid_block.register_forward_hook(lambda mod, i, o: grab.__setitem__("unet", o))
pool = lambda t: torch.cat([t.mean((2, 3)), t.amax((2, 3))], 1)

@torch.no_grad()
def feats(images):
    out = []
    for i in range(0, len(images), 32):
        x = to_model_range(torch.from_numpy(np.ascontiguousarray(images[i:i + 32])).permute(0, 3, 1, 2).float())
        zc, z0 = m.single_step(x)
        prob = m.decode_latent(z0)
        area = (prob > 0.5).float().mean((1, 2, 3))[:, None]
        out.append(torch.cat([pool(grab["enc"]), pool(zc), pool(grab["unet"]), pool(z0), area], 1).numpy())
    return np.concatenate(out)

t0 = time.time()
pos, neg, pos_src, neg_src = [], [], [], []
for d in sys.argv[2].split(","):
    ds = load_dataset(d, S, progress=False)
    crops = load_crops(d, S, per_image=1, progress=False)
    erased, decoys = erase_polyps(ds)
    pos += [feats(ds.images), feats(decoys.images)]
    neg += [feats(crops.images), feats(erased.images)]
held = feats(load_dataset(sys.argv[3], S, progress=False).images)
free_ds = load_polyp_free("../shared/data/polyp-free-val", S)
free = feats(free_ds.images)
c = m.config
np.savez(sys.argv[4], pos=np.concatenate(pos), neg=np.concatenate(neg), held=held, free=free,
         free_stems=np.array(free_ds.stems),
         dims=np.array([2 * 128, 2 * c.cond_channels, 2 * c.unet_block_out_channels[-1], 2 * c.latent_channels, 1]))
print(f"done in {time.time() - t0:.0f} s")
