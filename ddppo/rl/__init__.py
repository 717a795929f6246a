"""Reinforcement-learning core: PPO/GAE as pure functions and the recurrent rollout storage."""
