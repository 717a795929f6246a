"""Videos of episodes: the agent's view beside the top-down map with its path, as mp4 and as a TensorBoard GIF."""

from __future__ import annotations

import io
from pathlib import Path

import imageio.v2 as imageio_v2
import imageio.v3 as iio
import numpy as np
import torch

from ddppo.evaluation.episodes import agent_steps
from ddppo.sim.topdown import TopDownMap
from ddppo.sim.vector_env import PointNavVectorEnv


def _fit_height(img: np.ndarray, height: int) -> np.ndarray:
    """Nearest-neighbour resize to ``height`` rows (aspect kept); grey images become RGB."""
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    h, w = img.shape[:2]
    width = max(1, round(w * height / h))
    rows = (np.arange(height) * h // height).clip(0, h - 1)
    cols = (np.arange(width) * w // width).clip(0, w - 1)
    return img[rows][:, cols]


def episode_frame(obs: dict[str, torch.Tensor], envs: PointNavVectorEnv, topdown: TopDownMap, agent_xz,
                  env: int = 0, height: int = 256) -> np.ndarray:
    """The agent's view (RGB, depth as grey) beside the top-down map, all ``height`` pixels tall."""
    panels = []
    if "rgb" in obs:
        panels.append(obs["rgb"][env].cpu().numpy())
    if "depth" in obs:
        panels.append((obs["depth"][env, ..., 0].cpu().numpy() * 255).astype(np.uint8))
    goal = (float(envs.goal_x[env]), float(envs.goal_z[env])) if envs.has_goal else None
    panels.append(topdown.render(goal, agent_xz, float(envs.sim.theta[env])))
    frame = np.concatenate([_fit_height(p, height) for p in panels], axis=1)
    return frame[:, : frame.shape[1] // 2 * 2]  # even width for the H.264 encoder


def record_episodes(episodes, navs, cfg_sim, task, make_agent, max_frames: int = 600,
                    env_class: type[PointNavVectorEnv] = PointNavVectorEnv) -> list[list[np.ndarray]]:
    """Frames of each given episode, run one at a time with the agent in ``env_class`` (the task's batched
    environment: PointNav, Flee or Exploration)."""
    videos = []
    for ep in episodes:
        envs = env_class([ep], navs, 1, cfg_sim, task, order="partition")
        agent = make_agent(envs)
        obs = envs.reset()
        nav = envs.navs[int(envs.sim.scene_of[0])]
        topdown = TopDownMap(nav.scene, nav.navigable)
        pos = (float(envs.sim.x[0]), float(envs.sim.z[0]))
        frames = [episode_frame(obs, envs, topdown, pos)]
        for _, r, *_ in agent_steps(envs, agent, obs, max_steps=max_frames - 1):
            new = (float(r.info["agent_x"][0]), float(r.info["agent_z"][0]))
            topdown.add_segment(pos, new)
            pos = new
            shown = r.final_obs if r.done[0] else r.obs
            if r.done[0]:
                envs.active[0] = False  # one episode per video; draw the final pose, not the next episode
            frames.append(episode_frame(shown, envs, topdown, pos))
        videos.append(frames)
    return videos


def write_mp4(frames: list[np.ndarray], path: str | Path, fps: int = 10) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    imageio_v2.mimwrite(tmp, frames, fps=fps, macro_block_size=1)
    tmp.replace(path)
    return path


def add_video_to_tensorboard(writer, tag: str, frames: list[np.ndarray], step: int, fps: int = 10,
                             max_frames: int = 100) -> None:
    """An animated GIF in an image summary: what TensorBoard's video panel shows."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    stride = max(1, -(-len(frames) // max_frames))  # GIFs are large: keep at most max_frames, sped up to match
    frames = frames[::stride]
    buf = io.BytesIO()
    iio.imwrite(buf, np.stack(frames), extension=".gif", duration=1000 * stride / fps, loop=0)
    h, w = frames[0].shape[:2]
    image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue())
    writer.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    writer.writer.flush()
