"""dave"""
