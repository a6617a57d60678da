"""voicegateway"""
