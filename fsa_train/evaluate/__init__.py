"""Evaluations of exported models: passkey retrieval and validation loss by token position.

``fsa-train passkey`` (:func:`fsa_train.evaluate.passkey.passkey_main`) and
``fsa-train position-loss`` (:func:`fsa_train.evaluate.position_loss.position_loss_main`).
"""
